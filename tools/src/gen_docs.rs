//! The man pages and shell completions, generated from the clap definitions
//! so they always describe what the programs accept. Run when the package is
//! built (scripts/build-deb.sh):
//!
//!     cargo run -p tools --bin gen-docs -- OUTDIR
//!
//! writes `OUTDIR/man/virt-tpm-state.1`, one `virt-tpm-state-SUBCOMMAND.1`
//! per subcommand, `virt-tpm-state-hook.8`, and
//! `OUTDIR/completions/{virt-tpm-state.bash,_virt-tpm-state,virt-tpm-state.fish}`.
//! tests/manpages.rs includes this file to check its output.

// Also included as a module by tests/manpages.rs, which uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The manual section of the hook: it is run by libvirt, for administrators.
pub const HOOK_SECTION: &str = "8";

/// What [`generate`] wrote.
pub struct Generated {
    pub man: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

pub fn generate(out: &Path) -> std::io::Result<Generated> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;

    let cli = virt_tpm_state::cli::command();
    // One page for the command and one per (visible) subcommand, each named
    // virt-tpm-state-SUBCOMMAND(1) as the main page's list refers to them.
    clap_mangen::generate_to(cli.clone(), &man_dir)?;
    // The two main pages get the sections clap has no place for.
    let main = clap_mangen::Man::new(cli.clone());
    write_page(&man_dir.join(main.get_filename()), &main, CLI_EXTRA)?;
    let hook = clap_mangen::Man::new(virt_tpm_state::hook::command()).section(HOOK_SECTION);
    write_page(&man_dir.join(hook.get_filename()), &hook, HOOK_EXTRA)?;

    let mut completions = Vec::new();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut cmd = cli.clone();
        completions.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "virt-tpm-state",
            &comp_dir,
        )?);
    }

    let mut man: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    man.sort();
    Ok(Generated { man, completions })
}

/// The page as clap_mangen renders it, then `extra` (roff source).
fn write_page(path: &Path, man: &clap_mangen::Man, extra: &str) -> std::io::Result<()> {
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(extra.as_bytes());
    std::fs::write(path, page)
}

const CLI_EXTRA: &str = r#".SH "EXIT STATUS"
0 on success (including nothing to do). Each failure prints one line on standard error and
exits with its own code, shared with virt\-tpm\-state\-hook(8): 2 usage, 3 unreadable domain
XML, 4 invalid or absent metadata element, 5 element of another domain, 6 conflict refused,
7 unsafe path, 8 filesystem error, 9 lock timeout, 10 invalid config, 11 state not settled,
12 domain XML too large, 13 cannot connect to libvirt, 14 no such domain, 15 no emulated TPM,
16 libvirt denied the change, 17 domain running, 18 foreign hook in the way, 19 key problem,
20 out of sync too long (status), 101 internal error.
.SH FILES
.TP
/etc/virt\-tpm\-state/config.toml
configuration (optional; unknown keys are refused)
.TP
/etc/virt\-tpm\-state/keys/
host keys; copy them to every host the VMs move to
.TP
/etc/libvirt/hooks/qemu.d/virt\-tpm\-state
the installed hook
.TP
/var/lib/virt\-tpm\-state/
kept copies, backups of replaced states, sync journal
.SH "SEE ALSO"
virt\-tpm\-state\-hook(8), virsh(1), swtpm(8),
/usr/share/doc/virt\-tpm\-state/README.md.gz
"#;

const HOOK_EXTRA: &str = r#".SH "EXIT STATUS"
0 on success or nothing to do; otherwise the codes of virt\-tpm\-state(1): 2 usage, 3 unreadable
domain XML, 4 invalid metadata element, 5 element of another domain, 6 conflict refused,
7 unsafe path, 8 filesystem error, 9 lock timeout, 10 invalid config, 19 key problem.
libvirt aborts the operation on a non\-zero exit and shows the hook's line of standard error.
.SH FILES
.TP
/usr/libexec/virt\-tpm\-state/virt\-tpm\-state\-hook
the packaged binary, copied into /etc/libvirt/hooks/qemu.d/ by virt\-tpm\-state install
.TP
/etc/virt\-tpm\-state/config.toml
configuration, read on every call
.TP
/var/lib/libvirt/swtpm/\fIUUID\fR/
libvirt's TPM state dir, where the state is restored
.TP
/var/lib/virt\-tpm\-state/
kept copies, backups of replaced states, sync journal
.SH ENVIRONMENT
.TP
VIRT_TPM_STATE_ROOT
re\-roots every path the hook touches under this directory (tests only)
.SH "SEE ALSO"
virt\-tpm\-state(1), virt\-tpm\-state\-install(1)
"#;
