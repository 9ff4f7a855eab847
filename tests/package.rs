//! The Debian package, for real, in fresh Debian roots: the .deb built from
//! this checkout (scripts/build-deb.sh, on the host's Debian 12) and the
//! previous released build (scripts/build-prev-deb.sh) are installed with apt
//! inside private libvirt worlds that run a debootstrapped Debian 12 or 13
//! root (scripts/make-root.sh pkg-bookworm / pkg-trixie) with its own
//! libvirtd. The world's /usr, /etc and /var are overlays over the root
//! (world.sh WORLD_OVERLAY with VTS_WORLD_ROOTFS), so apt, dpkg, their
//! database and the maintainer scripts run for real against that libvirtd,
//! every test starts from the pristine root, and neither the root nor the
//! host changes.
//!
//! The roots lack swtpm, which the package depends on: `apt install
//! ./virt-tpm-state_*.deb` must resolve and install it (from the root's apt
//! cache, filled when the root was built, so no network at test time).
//!
//! Per root: a fresh install wires the hook and a VM whose XML carries TPM
//! state made on another host starts with that TPM, with no other command;
//! remove unwires and keeps the data; purge removes the config and keeps
//! keys, kept copies and backups, saying so. An upgrade from the previous
//! build keeps the hook wired (now the new one), the keys, an edited config
//! (without a prompt) and the kept state, and the next VM start restores
//! state the previous build stored. Run as root (docs/PACKAGING.md):
//! `cargo test --features fault-injection --test package -- --nocapture`.

#[macro_use]
mod common;

use common::{
    env::Env,
    runner::{must_run, output_with_stdin},
    world::*,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const PKG: &str = "virt-tpm-state";
const SYS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOOK: &str = "/etc/libvirt/hooks/qemu.d/virt-tpm-state";
const PACKAGED_HOOK: &str = "/usr/libexec/virt-tpm-state/virt-tpm-state-hook";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/virt-tpm-state-watch.service";
const CONFIG: &str = "/etc/virt-tpm-state/config.toml";
const SHIPPED_CONFIG: &str = "/usr/share/virt-tpm-state/config.toml";

/// What building the packages and the roots needs, beside a world.
const PACKAGE_ENV: &[Env] = &[
    Env::Runs(&["cargo", "deb", "--version"]),
    Env::Cmd("dpkg-deb"),
    Env::Cmd("dpkg-shlibdeps"),
    Env::Cmd("gzip"),
    Env::Cmd("strip"),
    Env::Cmd("debootstrap"),
    Env::Cmd("git"),
    Env::Overlayfs,
];

/// Runs one of this repository's scripts and returns the path it printed last.
fn script_output_path(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(root_dir().join(script))
        .args(args)
        .current_dir(root_dir())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let mut cmd = vec![script];
    cmd.extend_from_slice(args);
    assert!(out.status.success(), "{}", describe(&cmd, &out));
    let path = stdout(&out)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let path = root_dir().join(path);
    assert!(path.exists(), "{script} printed no path: {path:?}");
    path
}

/// The package of this checkout, built once per test process.
fn current_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| script_output_path("scripts/build-deb.sh", &[]))
}

/// The previous released build (scripts/build-prev-deb.sh says which).
fn previous_deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| script_output_path("scripts/build-prev-deb.sh", &[]))
}

/// A fresh Debian root: Debian 12 or 13 as released, libvirt running, no swtpm.
#[derive(Clone, Copy, PartialEq)]
enum Debian {
    Bookworm,
    Trixie,
}

impl Debian {
    fn profile(self) -> &'static str {
        match self {
            Debian::Bookworm => "pkg-bookworm",
            Debian::Trixie => "pkg-trixie",
        }
    }

    /// Built (or reused, by its stamp) once per test process.
    fn root(self) -> &'static Path {
        static BOOKWORM: OnceLock<PathBuf> = OnceLock::new();
        static TRIXIE: OnceLock<PathBuf> = OnceLock::new();
        let cell = match self {
            Debian::Bookworm => &BOOKWORM,
            Debian::Trixie => &TRIXIE,
        };
        cell.get_or_init(|| script_output_path("scripts/make-root.sh", &[self.profile()]))
    }

    /// `/etc/debian_version`'s major number in the root.
    fn major(self) -> &'static str {
        match self {
            Debian::Bookworm => "12",
            Debian::Trixie => "13",
        }
    }
}

/// A world P running `debian`'s root, /usr /etc /var overlaid, swtpm absent.
fn package_world(name: &str, debian: Debian) -> World {
    let root = debian.root().display().to_string();
    let version = std::fs::read_to_string(debian.root().join("etc/debian_version")).unwrap();
    assert!(
        version.starts_with(debian.major()),
        "{root} is Debian {version}, not {}",
        debian.major()
    );
    let p = World::up_env(
        name,
        &[
            ("WORLD_OVERLAY", "/usr /etc /var"),
            ("VTS_WORLD_ROOTFS", &root),
        ],
    );
    assert!(
        p.tree("/etc/libvirt/hooks/qemu.d").is_empty() && p.keys().is_empty(),
        "the package world starts with a hook or a key"
    );
    assert!(
        !sys(&p, &["dpkg-query", "-W", PKG]).status.success()
            && status_of(&p, "swtpm") != "install ok installed",
        "the fresh root already has {PKG} or swtpm"
    );
    p
}

/// What of a root a test must never change: its dpkg database and the
/// package's files.
fn root_traces(debian: Debian) -> String {
    let root = debian.root();
    let status = std::fs::read(root.join("var/lib/dpkg/status")).unwrap();
    let mut s = format!("dpkg status {}\n", sha256_hex(&status));
    for p in [
        "usr/bin/virt-tpm-state",
        "usr/libexec/virt-tpm-state",
        "etc/virt-tpm-state",
    ] {
        s.push_str(&format!(
            "{p}: {}\n",
            root.join(p).symlink_metadata().is_ok()
        ));
    }
    s
}

/// What the test must leave as it found it: the host's libvirt dirs and the root.
fn untouched(debian: Debian) -> (String, String) {
    (host_fingerprint(), root_traces(debian))
}

/// A system command inside the world, with a system PATH, non-interactive
/// as apt runs under automation (stdin is /dev/null: a prompt fails).
fn sys(w: &World, args: &[&str]) -> std::process::Output {
    w.exec_env(
        args,
        &[("PATH", SYS_PATH), ("DEBIAN_FRONTEND", "noninteractive")],
    )
}

fn must_sys(w: &World, args: &[&str]) -> String {
    let out = sys(w, args);
    let out = w.check(args, out);
    format!("{}{}", stdout(&out), stderr(&out))
}

/// `apt ARGS...` as an admin types it, plus -y. No conffile options
/// (--force-confold and the like): the package must not need them.
fn apt(w: &World, args: &[&str]) -> String {
    let mut cmd = vec!["apt", "-y", "-q"];
    cmd.extend_from_slice(args);
    must_sys(w, &cmd)
}

/// `apt install` of a .deb file. The dependencies it pulls in come from the
/// root's apt cache (filled when the root was built): nothing is fetched
/// from a mirror, so the test does not depend on one.
fn apt_install(w: &World, args: &[&str], deb: &Path) -> String {
    let deb = deb.display().to_string();
    let mut cmd = vec!["install"];
    cmd.extend_from_slice(args);
    cmd.push(&deb);
    let log = apt(w, &cmd);
    let fetched: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("Get:") && l.contains("://"))
        .collect();
    assert!(
        // apt 2.6 (Debian 12) and apt 3.0 (Debian 13) word it differently.
        fetched.is_empty()
            && (log.contains("Need to get 0 B/") || log.contains("Download size: 0 B /")),
        "apt fetched from a mirror: {fetched:?}\n{log}"
    );
    log
}

fn status_of(w: &World, pkg: &str) -> String {
    let out = sys(w, &["dpkg-query", "-W", "-f=${Status}", pkg]);
    stdout(&out).trim().to_string()
}

fn version_of(w: &World, pkg: &str) -> String {
    must_sys(w, &["dpkg-query", "-W", "-f=${Version}", pkg])
        .trim()
        .to_string()
}

fn deb_field(deb: &Path, field: &str) -> String {
    let out = must_run(
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(field),
        "dpkg-deb -f",
    );
    stdout(&out).trim().to_string()
}

/// Whether `path` exists inside the world (the overlays are only visible there).
fn exists_in(w: &World, path: &str) -> bool {
    sys(w, &["test", "-e", path]).status.success() || sys(w, &["test", "-L", path]).status.success()
}

/// The pid of the world's libvirtd (its pid file, written by world.sh).
fn libvirtd_pid(w: &World) -> u32 {
    let pid = std::fs::read_to_string(w.dir.join("libvirtd.pid")).expect("libvirtd.pid");
    let pid: u32 = pid.trim().parse().expect("numeric pid");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "libvirtd {pid} is not running"
    );
    pid
}

/// The key files of the world, name and content.
fn key_files(w: &World) -> Vec<(String, Vec<u8>)> {
    w.keys()
        .into_iter()
        .map(|k| {
            let c = std::fs::read(w.host_path("/etc/virt-tpm-state/keys").join(&k)).unwrap();
            (k, c)
        })
        .collect()
}

/// /var/lib/virt-tpm-state (kept copies, backups, sync journal): every
/// entry, with the sha256 of each file, so "left alone" means byte for byte.
fn var_snapshot(w: &World) -> Vec<String> {
    let base = w.host_path("/var/lib/virt-tpm-state");
    w.tree("/var/lib/virt-tpm-state")
        .into_iter()
        .map(|rel| {
            let path = base.join(&rel);
            if path.is_file() {
                format!("{rel} {}", sha256_hex(&std::fs::read(&path).unwrap()))
            } else {
                rel
            }
        })
        .collect()
}

/// The metadata element's digest and generation in the persistent definition,
/// read with the development CLI (the packaged one may be gone).
fn metadata(w: &World, vm: &Vm) -> (String, u64) {
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["valid"], true, "{j:#}");
    (
        j["digest"].as_str().expect("digest").to_string(),
        j["generation"].as_u64().expect("generation"),
    )
}

/// Defines `vm`, lets libvirt manufacture its TPM, plants `secret`, stores
/// with `cli` (the development build, or the packaged `virt-tpm-state`).
fn vm_secret(w: &World, vm: &Vm, secret: &str, cli: &str) {
    w.manufacture(vm);
    w.write_secret(vm, secret);
    let out = must_sys(w, &[cli, "store", &vm.name]);
    assert!(out.contains("stored generation"), "store said: {out}");
}

/// The checks on the .deb file itself: what apt must resolve, and that the
/// config is not a conffile (docs/PACKAGING.md, "The config").
fn check_deb_file(deb: &Path) {
    let depends = deb_field(deb, "Depends");
    for dep in ["libc6", "libvirt0", "swtpm", "init-system-helpers"] {
        assert!(
            depends.split(',').any(|d| d.trim().starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }
    let recommends = deb_field(deb, "Recommends");
    assert!(
        recommends.contains("libvirt-daemon-system"),
        "Recommends: {recommends}"
    );
    let conffiles = Command::new("dpkg-deb")
        .arg("--ctrl-tarfile")
        .arg(deb)
        .output()
        .expect("dpkg-deb --ctrl-tarfile");
    let list = output_with_stdin(Command::new("tar").arg("-t"), &conffiles.stdout);
    assert!(
        !stdout(&list).contains("conffiles"),
        "the package has conffiles (an edited config would prompt on upgrade): {}",
        stdout(&list)
    );
}

/// A VM with a secret in its TPM on host A (a world on this host, running
/// the development build), stored into the metadata: its persistent XML is
/// what travels. Returns (world A, the VM, its XML, its permall, its EK).
fn origin(name: &str, vm_name: &str) -> (World, Vm, String, Vec<u8>, String) {
    let a = World::with_hook(name);
    let vm = Vm::new(vm_name, Tpm::V2);
    let ek = a.stored_with_secret(&vm, "packaged-secret");
    let stored = a.must_permall(&vm);
    let (_, xml) = a.dump(&vm.name, "carried.xml", true);
    (a, vm, xml, stored, ek)
}

/// A fresh install with apt, the carried VM, remove and purge.
fn fresh_install_remove_purge(test: &str, debian: Debian) {
    if !common::env::ready(test, &[Env::Libvirt, Env::All(PACKAGE_ENV)]) {
        return;
    }
    let deb = current_deb();
    let before = untouched(debian);
    check_deb_file(deb);
    let (a, vm, xml, stored, ek) = origin(&format!("pkg-origin-{}", debian.profile()), "carried");

    let p = package_world(&format!("pkg-{}", debian.profile()), debian);
    let daemon = libvirtd_pid(&p);
    // apt resolves the dependencies: swtpm (absent from the root) comes in.
    let log = apt_install(&p, &[], deb);
    assert_eq!(
        status_of(&p, "swtpm"),
        "install ok installed",
        "apt did not install swtpm:\n{log}"
    );
    for said in [
        format!("installed {HOOK} (from {PACKAGED_HOOK})"),
        "created key".to_string(),
        "sent SIGHUP to libvirtd".to_string(),
    ] {
        assert!(log.contains(&said), "postinst did not say {said:?}:\n{log}");
    }
    assert_eq!(status_of(&p, PKG), "install ok installed");
    assert_eq!(
        libvirtd_pid(&p),
        daemon,
        "libvirtd was restarted, not signalled"
    );
    // The hook libvirt runs is the packaged binary, wired by the postinst.
    assert_eq!(p.tree("/etc/libvirt/hooks/qemu.d"), vec!["virt-tpm-state"]);
    must_sys(&p, &["cmp", HOOK, PACKAGED_HOOK]);
    assert_eq!(p.keys().len(), 1, "the postinst made no key (or more)");
    let packaged_key = key_files(&p);
    let shipped = std::fs::read(root_dir().join("dist/deb/config.toml")).unwrap();
    assert_eq!(
        std::fs::read(p.host_path(CONFIG)).unwrap(),
        shipped,
        "the installed config is not dist/deb/config.toml"
    );
    must_sys(&p, &["cmp", CONFIG, SHIPPED_CONFIG]);
    assert!(exists_in(&p, WANTS), "the watch unit is not enabled");
    // The packaged unit names the installed binary and passes the root's
    // systemd's check (that systemd's own directives and sandboxing).
    let unit = "/usr/lib/systemd/system/virt-tpm-state-watch.service";
    let out = sys(&p, &["systemd-analyze", "verify", unit]);
    if !out.status.success() || !out.stderr.is_empty() {
        p.fail(
            "systemd-analyze verify failed",
            &["systemd-analyze", "verify", unit],
            &out,
        );
    }
    let complete = must_sys(
        &p,
        &[
            "bash",
            "-c",
            ". /usr/share/bash-completion/completions/virt-tpm-state && complete -p virt-tpm-state",
        ],
    );
    assert!(complete.contains("virt-tpm-state"), "{complete}");
    let version = must_sys(&p, &["virt-tpm-state", "--version"]);
    assert_eq!(
        version.trim(),
        format!("virt-tpm-state {}", env!("CARGO_PKG_VERSION"))
    );

    // Man pages render, from the index man-db's trigger built.
    for (page, has) in [
        (vec!["virt-tpm-state"], "virt-tpm-state-store(1)"),
        (vec!["8", "virt-tpm-state-hook"], "SUBOP"),
    ] {
        let mut args = vec!["env", "MANPAGER=cat", "MANWIDTH=100", "man"];
        args.extend(page.iter().copied());
        let text = must_sys(&p, &args);
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS") && text.contains(has),
            "man {page:?} rendered:\n{text}"
        );
    }

    // The carried VM starts on P with its TPM: the installed hook restored
    // it, on the first start after `apt install`, with no other command.
    a.copy_keys_to(&p);
    p.define_xml("carried.xml", &xml);
    assert!(!p.swtpm_uuid_dir_exists(&vm.uuid));
    p.assert_restores(
        &vm,
        &stored,
        "packaged-secret",
        Some(&ek),
        "the package host, stored on host A",
    );
    // The packaged CLI reads it (and the hook's post-stop store, run by
    // /usr/bin/virt-tpm-state, has settled).
    let shown = must_sys(&p, &["virt-tpm-state", "show", "--inactive", &vm.name]);
    assert!(!shown.is_empty());

    // Installing again (prerm upgrade, postinst configure with the old
    // version) keeps the hook wired, makes no second key, keeps an edited
    // config without asking.
    let edited = String::from_utf8(shipped)
        .unwrap()
        .replace("# backups_per_domain = 5", "backups_per_domain = 6");
    std::fs::write(p.host_path(CONFIG), &edited).unwrap();
    let keys_before = key_files(&p);
    let log = apt_install(&p, &["--reinstall"], deb);
    assert!(
        log.contains(&format!("installed {HOOK} (from {PACKAGED_HOOK})"))
            && !log.contains("created key"),
        "reinstall:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(p.host_path(CONFIG)).unwrap(),
        edited
    );
    assert_eq!(p.tree("/etc/libvirt/hooks/qemu.d"), vec!["virt-tpm-state"]);
    assert_eq!(key_files(&p), keys_before, "the reinstall changed the keys");

    // The VM comes back from host A with a newer TPM: the hook restores it
    // and backs up the local state it replaces (a backup removal must keep).
    a.write_secret(&vm, "newer-secret");
    a.must_store(&vm.name);
    let (_, newer_xml) = a.dump(&vm.name, "newer.xml", true);
    p.define_xml("newer.xml", &newer_xml);
    assert_eq!(p.secret_after_start(&vm), "newer-secret");
    let backups = format!("/var/lib/virt-tpm-state/backups/{}", vm.uuid);
    assert!(
        !p.tree(&backups).is_empty(),
        "the replaced state was not backed up"
    );
    let meta = metadata(&p, &vm);
    let var_tree = var_snapshot(&p);
    for what in ["kept/", "backups/", "synced/"] {
        assert!(
            var_tree
                .iter()
                .any(|e| e.starts_with(what) && e.len() > what.len()),
            "nothing in {what}: {var_tree:?}"
        );
    }
    let keys = key_files(&p);
    assert!(keys.len() == 2 && keys.iter().any(|k| packaged_key.contains(k)));

    // apt remove: the hook is unwired, the programs go; the config, keys,
    // kept copies, backups and the metadata stay. With a broken config too:
    // it must not keep the hook wired.
    let config = p.host_path(CONFIG);
    p.append_config("no_such_key = 1");
    let out = p.vts(&["show", &vm.name]);
    assert_eq!(out.status.code(), Some(10), "the config is not broken");
    let log = apt(&p, &["remove", PKG]);
    std::fs::write(&config, &edited).unwrap();
    assert!(
        log.contains(&format!("removed {HOOK}")) && log.contains("sent SIGHUP to libvirtd"),
        "prerm did not unwire the hook:\n{log}"
    );
    assert!(p.tree("/etc/libvirt/hooks/qemu.d").is_empty());
    for gone in ["/usr/bin/virt-tpm-state", PACKAGED_HOOK] {
        assert!(!exists_in(&p, gone), "{gone} left after remove");
    }
    assert_eq!(status_of(&p, PKG), "deinstall ok config-files");
    assert_eq!(key_files(&p), keys, "keys changed on remove");
    assert_eq!(var_snapshot(&p), var_tree);
    assert_eq!(metadata(&p, &vm), meta, "metadata changed on remove");
    // libvirt starts the VM without the hook (nothing dangling in its way).
    p.start(&vm.name, true);
    p.must_virsh(&["destroy", &vm.name]);
    assert_eq!(var_snapshot(&p), var_tree);

    // apt purge: the config and the unit's enablement go; keys, kept copies,
    // backups and metadata stay, and the postrm says so.
    let log = apt(&p, &["purge", PKG]);
    assert!(
        log.contains("kept /etc/virt-tpm-state/keys and /var/lib/virt-tpm-state"),
        "postrm did not say what it kept:\n{log}"
    );
    assert!(
        !sys(&p, &["dpkg-query", "-W", PKG]).status.success(),
        "{PKG} still known to dpkg"
    );
    assert!(!config.exists(), "purge left {CONFIG}");
    assert!(!exists_in(&p, WANTS), "the watch unit is still enabled");
    assert_eq!(key_files(&p), keys, "keys changed on purge");
    assert_eq!(var_snapshot(&p), var_tree);
    assert_eq!(metadata(&p, &vm), meta, "metadata changed on purge");

    drop(p);
    drop(a);
    assert_eq!(
        untouched(debian),
        before,
        "the host's libvirt dirs or the root changed"
    );
}

/// Stand-ins for systemd's commands, inside the world only: this machine has
/// no systemd, so what the maintainer scripts ask of it is recorded (in
/// /run/systemd-calls) instead of done. /run/systemd/system makes the
/// scripts believe systemd runs. The stand-ins replace the root's
/// /usr/bin/systemctl and deb-systemd-invoke in the world's /usr overlay
/// (apt runs dpkg with PATH=/usr/sbin:/usr/bin:/sbin:/bin, so a copy in
/// /usr/local would not be used); `true` undoes it. Everything else in the
/// upgrade is real.
fn record_systemd_calls(p: &World, on: bool) {
    let shim = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >>/run/systemd-calls\n";
    let script = if on {
        format!(
            "mkdir -p /run/systemd/system && : >/run/systemd-calls && \
             for c in /usr/bin/systemctl /usr/bin/deb-systemd-invoke; do \
             mv $c $c.world-real && printf '%s' '{shim}' >$c && chmod 755 $c; done"
        )
    } else {
        "rm -r /run/systemd && for c in /usr/bin/systemctl /usr/bin/deb-systemd-invoke; do \
         mv $c.world-real $c; done"
            .to_string()
    };
    must_sys(p, &["sh", "-c", &script]);
}

fn systemd_calls(p: &World) -> String {
    must_sys(p, &["cat", "/run/systemd-calls"])
}

/// The previous build installed with apt, a VM's TPM stored by it, the
/// config edited; then `apt install` of this checkout's package.
fn upgrade_from_previous_build(test: &str, debian: Debian) {
    if !common::env::ready(test, &[Env::Libvirt, Env::All(PACKAGE_ENV)]) {
        return;
    }
    let (prev, deb) = (previous_deb(), current_deb());
    let before = untouched(debian);
    let p = package_world(&format!("pkg-up-{}", debian.profile()), debian);
    let daemon = libvirtd_pid(&p);

    let log = apt_install(&p, &[], prev);
    let prev_version = deb_field(prev, "Version");
    assert_eq!(version_of(&p, PKG), prev_version);
    assert!(
        log.contains(&format!("installed {HOOK} (from {PACKAGED_HOOK})"))
            && log.contains("created key"),
        "the previous build's postinst:\n{log}"
    );
    // That build shipped the config as a conffile: the upgrade must carry
    // an edited one over without dpkg's conffile prompt.
    let conffiles = must_sys(&p, &["dpkg-query", "-W", "-f=${Conffiles}", PKG]);
    assert!(
        conffiles.contains(CONFIG),
        "the previous build's conffiles: {conffiles}"
    );
    let edited = std::fs::read_to_string(p.host_path(CONFIG))
        .unwrap()
        .replace("# backups_per_domain = 5", "backups_per_domain = 6");
    assert!(edited.contains("\nbackups_per_domain = 6"));
    std::fs::write(p.host_path(CONFIG), &edited).unwrap();
    let shipped_now = std::fs::read_to_string(root_dir().join("dist/deb/config.toml")).unwrap();
    assert_ne!(
        std::fs::read_to_string(p.host_path(SHIPPED_CONFIG)).unwrap_or_default(),
        shipped_now,
        "the previous build ships today's config: the upgrade would not meet a changed default"
    );

    // A VM whose TPM the previous build kept (at stop) and stored.
    let vm = Vm::new("upgraded", Tpm::V2);
    vm_secret(&p, &vm, "stored-by-the-previous-build", "virt-tpm-state");
    let stored = p.must_permall(&vm);
    let (_, xml) = p.dump(&vm.name, "upgraded.xml", true);
    let meta = metadata(&p, &vm);
    let keys = key_files(&p);
    let var_tree = var_snapshot(&p);
    assert!(
        var_tree
            .iter()
            .any(|e| e.starts_with("kept/") && e.len() > 5),
        "the previous build kept nothing: {var_tree:?}"
    );
    let old_hook = std::fs::read(p.host_path(HOOK)).unwrap();

    // The upgrade, as an admin runs it: no conffile options, stdin not a
    // terminal (a prompt would fail it).
    record_systemd_calls(&p, true);
    let log = apt_install(&p, &[], deb);
    assert_eq!(version_of(&p, PKG), deb_field(deb, "Version"));
    assert!(
        log.contains(&format!("installed {HOOK} (from {PACKAGED_HOOK})"))
            && log.contains("sent SIGHUP to libvirtd")
            && !log.contains("created key"),
        "the upgrade's postinst:\n{log}"
    );
    assert!(
        !log.contains("Configuration file"),
        "dpkg asked about the config:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(p.host_path(CONFIG)).unwrap(),
        edited,
        "the edited config changed"
    );
    must_sys(
        &p,
        &[
            "cmp",
            SHIPPED_CONFIG,
            &root_dir()
                .join("dist/deb/config.toml")
                .display()
                .to_string(),
        ],
    );
    assert_eq!(key_files(&p), keys, "the upgrade changed the keys");
    assert_eq!(
        var_snapshot(&p),
        var_tree,
        "the upgrade changed the kept state"
    );
    assert_eq!(metadata(&p, &vm), meta);
    // The hook is still wired, and is now the new build's.
    assert_eq!(p.tree("/etc/libvirt/hooks/qemu.d"), vec!["virt-tpm-state"]);
    must_sys(&p, &["cmp", HOOK, PACKAGED_HOOK]);
    assert_ne!(
        std::fs::read(p.host_path(HOOK)).unwrap(),
        old_hook,
        "the hook was not replaced"
    );
    // libvirtd was signalled (it rereads its hooks), not restarted; the
    // watch daemon's unit was restarted (where systemd runs).
    assert_eq!(libvirtd_pid(&p), daemon);
    let calls = systemd_calls(&p);
    assert!(
        calls.contains("deb-systemd-invoke restart virt-tpm-state-watch.service"),
        "the upgrade did not restart the watch daemon: {calls:?}"
    );
    record_systemd_calls(&p, false);

    // The next start needs no other command: the VM, undefined (libvirt
    // deletes its TPM state) and defined again from its XML, starts with the
    // TPM the previous build stored, restored by the new hook.
    p.undefine(&vm);
    p.define_xml("upgraded.xml", &xml);
    p.assert_restores(
        &vm,
        &stored,
        "stored-by-the-previous-build",
        None,
        "after the upgrade",
    );

    // Purge after the upgrade (the config was a conffile of the old build):
    // the config goes, keys stay.
    apt(&p, &["purge", PKG]);
    assert!(!p.host_path(CONFIG).exists(), "purge left {CONFIG}");
    assert_eq!(key_files(&p), keys, "keys changed on purge");

    drop(p);
    assert_eq!(
        untouched(debian),
        before,
        "the host's libvirt dirs or the root changed"
    );
}

#[test]
fn debian12_apt_install_runs_the_hook_remove_and_purge_keep_data() {
    fresh_install_remove_purge(
        "debian12_apt_install_runs_the_hook_remove_and_purge_keep_data",
        Debian::Bookworm,
    );
}

#[test]
fn debian13_apt_install_runs_the_hook_remove_and_purge_keep_data() {
    fresh_install_remove_purge(
        "debian13_apt_install_runs_the_hook_remove_and_purge_keep_data",
        Debian::Trixie,
    );
}

#[test]
fn debian12_upgrade_from_the_previous_build_keeps_hook_keys_config_and_state() {
    upgrade_from_previous_build(
        "debian12_upgrade_from_the_previous_build_keeps_hook_keys_config_and_state",
        Debian::Bookworm,
    );
}

#[test]
fn debian13_upgrade_from_the_previous_build_keeps_hook_keys_config_and_state() {
    upgrade_from_previous_build(
        "debian13_upgrade_from_the_previous_build_keeps_hook_keys_config_and_state",
        Debian::Trixie,
    );
}
