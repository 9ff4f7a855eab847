//! The libvirt qemu hook (`/etc/libvirt/hooks/qemu.d/`). Install with
//! `virt-tpm-state install`; its logic is the library's (`src/hook.rs`).
//! Exit codes: see README ("Exit codes"). Never writes to stdout.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use virt_tpm_state::{hook, logging, paths::Paths};

fn main() -> ExitCode {
    // Keeps the marker in the binary: `install` recognises its own hook by it.
    std::hint::black_box(hook::HOOK_MARKER);
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Ops we do nothing for return before any set-up: this hook runs inside
    // every VM start, stop and migration on the host.
    if let Ok(a) = hook::parse_args(&args) {
        if hook::HookOp::from_args(a.op, a.subop) == hook::HookOp::Ignored {
            return ExitCode::SUCCESS;
        }
    }
    // Nothing this process creates is ever more open than it sets it.
    virt_tpm_state::fs::restrict_umask();
    logging::install_panic_hook("virt-tpm-state-hook");
    logging::init(
        "virt-tpm-state-hook",
        log::LevelFilter::Info,
        log::LevelFilter::Warn,
    );
    match hook::run(&args, std::io::stdin().lock(), &Paths::from_env()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: libvirt shows it as the reason the operation failed.
            logging::report_error(&format!("virt-tpm-state: {e}"));
            e.exit_code().into()
        }
    }
}
