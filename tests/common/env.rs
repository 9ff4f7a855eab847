//! The one environment gate. A test names what it needs with
//! `require!(Env::Root, Env::Cmd("xmllint"), …)` as its first line; when
//! something is missing it prints one line, `SKIP <test>: missing <what>,
//! <what>`, and returns, except under `CI=true`, where CI provides the
//! whole environment (scripts/install-deps.sh) and a gap is a failure.
//! A test that can run a part without some tool asks [`ready`] directly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Something a test needs from the machine it runs on.
#[derive(Debug, Clone, Copy)]
pub enum Env {
    /// Effective uid 0 (chown, mounts, useradd, worlds).
    Root,
    /// A command on PATH or in /usr/sbin, /sbin.
    Cmd(&'static str),
    /// A probe that must exit 0 (e.g. a python module's import).
    Runs(&'static [&'static str]),
    /// A file that must exist (e.g. `/usr/bin/python3`, named by path in
    /// scripts the tests run).
    File(&'static str),
    /// Everything a private libvirt world needs (tests/e2e/world.sh): root,
    /// libvirtd, swtpm, tpm2-tools, QEMU, and a complete
    /// `VTS_WORLD_ROOTFS` when one is named.
    Libvirt,
    /// `virt-fw-vars` (python virt-firmware), to edit OVMF variable stores.
    FwVars,
    /// The named fault points (built with `--features fault-injection`).
    Faults,
    /// overlayfs in this kernel.
    Overlayfs,
    /// All of these.
    All(&'static [Env]),
}

/// The commands a world runs (tests/e2e/world.sh, tests/e2e/tpm.sh).
const WORLD_COMMANDS: &[&str] = &[
    "libvirtd",
    "virtlogd",
    "virsh",
    "swtpm",
    "swtpm_ioctl",
    "swtpm_setup",
    "tpm2_nvread",
    "tpm2_readpublic",
    "qemu-system-x86_64",
    "nsenter",
    "unshare",
    "python3",
    "ss",
];

/// Whether `cmd` is on PATH or in /usr/sbin, /sbin.
pub fn on_path(cmd: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .any(|d| d.join(cmd).is_file())
}

fn runs(probe: &[&str]) -> bool {
    Command::new(probe[0])
        .args(&probe[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What of `env` this machine lacks, one phrase each.
fn missing(env: &Env, out: &mut Vec<String>) {
    match env {
        Env::Root => {
            if !nix::unistd::geteuid().is_root() {
                out.push("root".into());
            }
        }
        Env::Cmd(cmd) => {
            if !on_path(cmd) {
                out.push((*cmd).into());
            }
        }
        Env::Runs(probe) => {
            if !runs(probe) {
                out.push(format!("`{}` succeeding", probe.join(" ")));
            }
        }
        Env::File(path) => {
            if !Path::new(path).is_file() {
                out.push((*path).into());
            }
        }
        Env::Libvirt => {
            missing(&Env::Root, out);
            for cmd in WORLD_COMMANDS {
                missing(&Env::Cmd(cmd), out);
            }
            if let Some(root) = std::env::var_os("VTS_WORLD_ROOTFS") {
                let root = PathBuf::from(root);
                if !root.join(".vts-root-complete").is_file()
                    || !root.join("usr/sbin/libvirtd").is_file()
                {
                    out.push(format!(
                        "a complete VTS_WORLD_ROOTFS={} (scripts/make-root.sh bookworm-bpo|sid)",
                        root.display()
                    ));
                }
            }
        }
        Env::FwVars => {
            if !runs(&["virt-fw-vars", "--help"]) {
                out.push("virt-fw-vars (pip install virt-firmware)".into());
            }
        }
        Env::Faults => {
            if !virt_tpm_state::fault::ENABLED {
                out.push("the fault points (build with --features fault-injection)".into());
            }
        }
        Env::Overlayfs => {
            let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
            if !fs.lines().any(|l| l.trim_end().ends_with("\toverlay")) {
                out.push("overlayfs in this kernel".into());
            }
        }
        Env::All(all) => {
            for e in *all {
                missing(e, out);
            }
        }
    }
}

/// `true` when nothing of `env` is missing; else one `SKIP` line naming
/// what is, or a panic under `CI=true`.
pub fn ready(test: &str, env: &[Env]) -> bool {
    let mut gaps = Vec::new();
    for e in env {
        missing(e, &mut gaps);
    }
    gaps.dedup();
    if gaps.is_empty() {
        return true;
    }
    let gaps = gaps.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: missing {gaps} under CI=true (scripts/install-deps.sh provides it)");
    }
    eprintln!("SKIP {test}: missing {gaps}");
    false
}

/// The test function's name (the last path segment of the enclosing fn).
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = name_of(here);
        let name = name.strip_suffix("::here").unwrap_or(name);
        name.rsplit("::").next().unwrap_or(name)
    }};
}

/// Returns from the test (after one `SKIP` line) unless the machine has
/// everything named; fails instead under `CI=true`. See [`ready`].
#[macro_export]
macro_rules! require {
    ($($env:expr),+ $(,)?) => {
        if !$crate::common::env::ready($crate::test_name!(), &[$($env),+]) {
            return;
        }
    };
}
