//! The exit codes the hook and the CLI share: one enum, one line per code.
//!
//! Every error type maps into [`Exit`] (`exit_code()` on `FsError`,
//! `RestoreError`, `HookError`, `CliError`), so a condition has one code
//! wherever it is met. The README's "Exit codes" table is checked against
//! [`Exit::ALL`] by a test (`readme_exit_table_matches_the_enum`): a code
//! added here and not documented there, or the other way round, fails it.

use std::process::ExitCode;

/// A process exit status of `virt-tpm-state` or `virt-tpm-state-hook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    /// Success, including "nothing to do" and "unchanged".
    Success = 0,
    /// A libvirt call failed for a reason no other code names.
    LibvirtFailed = 1,
    /// Usage error (arguments).
    Usage = 2,
    /// The domain XML is unreadable or malformed.
    DomainXml = 3,
    /// The element is invalid, absent where needed, or does not fit the domain.
    InvalidElement = 4,
    /// The element belongs to another domain (a clone).
    Clone = 5,
    /// A conflict refused by `on_conflict = "refuse"`.
    Conflict = 6,
    /// An unsafe path: a link, hard link or non-directory, or a dir others can change.
    UnsafePath = 7,
    /// Any other filesystem failure.
    Filesystem = 8,
    /// Timed out waiting for the per-VM lock.
    LockTimeout = 9,
    /// The config file is invalid.
    Config = 10,
    /// `store`: the state kept changing.
    StillChanging = 11,
    /// `store`: the domain XML would grow past `max_domain_xml_size`.
    TooLarge = 12,
    /// libvirt cannot be reached (or cannot say whether the domain runs).
    LibvirtUnreachable = 13,
    /// No such domain.
    NoDomain = 14,
    /// The domain carries nothing (no emulated TPM, no carried NVRAM) or has no state yet.
    NoTpm = 15,
    /// libvirt denied the change.
    Denied = 16,
    /// The domain is running (or did not stop).
    Running = 17,
    /// `install`/`uninstall`: a foreign hook is in the way.
    ForeignHook = 18,
    /// An encryption key problem.
    Key = 19,
    /// `status`: a domain is out of sync for too long.
    OutOfSync = 20,
    /// An internal error (a bug); Rust's own panic status.
    Internal = 101,
}

impl Exit {
    /// Every code, in the README table's order.
    #[cfg(test)]
    pub(crate) const ALL: [Exit; 22] = [
        Exit::Success,
        Exit::LibvirtFailed,
        Exit::Usage,
        Exit::DomainXml,
        Exit::InvalidElement,
        Exit::Clone,
        Exit::Conflict,
        Exit::UnsafePath,
        Exit::Filesystem,
        Exit::LockTimeout,
        Exit::Config,
        Exit::StillChanging,
        Exit::TooLarge,
        Exit::LibvirtUnreachable,
        Exit::NoDomain,
        Exit::NoTpm,
        Exit::Denied,
        Exit::Running,
        Exit::ForeignHook,
        Exit::Key,
        Exit::OutOfSync,
        Exit::Internal,
    ];

    /// The numeric status.
    pub(crate) fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::Exit;

    /// The codes in README.md's "Exit codes" table, in order.
    fn readme_codes() -> Vec<u8> {
        let readme = include_str!("../README.md");
        let table = readme
            .split("\n## Exit codes\n")
            .nth(1)
            .expect("README.md has an \"## Exit codes\" section");
        table
            .lines()
            .skip_while(|l| !l.starts_with("| code"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cell = l.trim_start_matches('|').split('|').next().unwrap().trim();
                cell.parse()
                    .unwrap_or_else(|_| panic!("README exit table row without a code: {l}"))
            })
            .collect()
    }

    #[test]
    fn readme_exit_table_matches_the_enum() {
        let ours: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(
            readme_codes(),
            ours,
            "README.md's exit code table and src/exit.rs disagree"
        );
    }

    #[test]
    fn codes_are_distinct() {
        let mut codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Exit::ALL.len());
    }
}
