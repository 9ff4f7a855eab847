//! The less trusted users of a Debian host (issue 16), and running a
//! command as one of them.

use super::runner::show;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The less trusted users of a Debian host, as ids: the QEMU user (owns
/// `/var/lib/libvirt/qemu`) and the swtpm user (owns each `tpm2/`).
#[derive(Clone, Copy, Debug)]
pub struct Users {
    pub qemu_uid: u32,
    pub qemu_gid: u32,
    pub tss_uid: u32,
    pub tss_gid: u32,
}

/// `libvirt-qemu` and `tss`, each with a group of its name, created with
/// `useradd --system` / `groupadd --system` where missing (root only; once
/// per test process). The gids are those of the groups named like the users
/// (Debian's `libvirt-qemu` has primary group `kvm`, and a `libvirt-qemu`
/// group that qemu.conf's `group` names).
pub fn users() -> Users {
    static USERS: std::sync::OnceLock<Users> = std::sync::OnceLock::new();
    *USERS.get_or_init(|| {
        let (qemu_uid, qemu_gid) = ensure_user("libvirt-qemu");
        let (tss_uid, tss_gid) = ensure_user("tss");
        Users {
            qemu_uid,
            qemu_gid,
            tss_uid,
            tss_gid,
        }
    })
}

fn ensure_user(name: &str) -> (u32, u32) {
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        assert!(out.status.success(), "{args:?}\n{}", show(&out));
    };
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        run(&[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]);
    }
    if nix::unistd::Group::from_name(name).ok().flatten().is_none() {
        run(&["groupadd", "--system", name]);
    }
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("user {name} missing after useradd"));
    let g = nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("group {name} missing after groupadd"));
    (u.uid.as_raw(), g.gid.as_raw())
}

/// `cmd...` as `uid:gid` without supplementary groups or capabilities
/// (`setpriv`), with a clean environment.
pub fn as_user(uid: u32, gid: u32, cmd: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--inh-caps=-all")
        .arg("--")
        .args(cmd)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    c
}

/// Runs [`as_user`]; panics with everything unless it succeeded.
pub fn must_as_user(uid: u32, gid: u32, cmd: &[&str]) -> Output {
    let out = as_user(uid, gid, cmd).output().expect("run setpriv");
    assert!(
        out.status.success(),
        "as {uid}:{gid}: {cmd:?}\n{}",
        show(&out)
    );
    out
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}
