//! `virt-tpm-state`: store, show, restore and extract a VM's TPM state in its
//! domain XML; install the hook. Exit codes: see README ("Exit codes").

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    virt_tpm_state::cli::main()
}
