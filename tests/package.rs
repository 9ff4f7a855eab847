//! The Debian package, for real: built from this checkout with
//! scripts/build-deb.sh, installed with dpkg inside a private libvirt world
//! whose /usr, /etc and /var are overlays (world.sh WORLD_OVERLAY), so dpkg,
//! its database and the maintainer scripts run for real against the world's
//! libvirtd while the host's package database and files never change.
//!
//! A VM whose XML carries TPM state made on another host (a world running
//! the development build) starts with that TPM through the hook the postinst
//! wired; then remove and purge, and what must stay stays. Run as root:
//! `cargo test --test package -- --nocapture`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

const PKG: &str = "virt-tpm-state";
const SYS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOOK: &str = "/etc/libvirt/hooks/qemu.d/virt-tpm-state";
const PACKAGED_HOOK: &str = "/usr/libexec/virt-tpm-state/virt-tpm-state-hook";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/virt-tpm-state-watch.service";

/// The e2e environment plus what building and inspecting a package needs.
fn require_package_env(test: &str) -> bool {
    if !require_env(test) {
        return false;
    }
    let mut missing = Vec::new();
    let deb = Command::new("cargo").args(["deb", "--version"]).output();
    if !matches!(deb, Ok(ref o) if o.status.success()) {
        missing.push("cargo-deb not installed (scripts/install-deps.sh)".to_string());
    }
    for cmd in [
        "dpkg",
        "dpkg-deb",
        "dpkg-shlibdeps",
        "man",
        "gzip",
        "strip",
        "systemd-analyze",
    ] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(cmd).is_file());
        if !found {
            missing.push(format!("{cmd} not found"));
        }
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.trim_end().ends_with("\toverlay")) {
        missing.push("no overlayfs in this kernel".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: the package test environment is incomplete under CI=true: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

fn build_deb() -> PathBuf {
    let out = Command::new(root_dir().join("scripts/build-deb.sh"))
        .current_dir(root_dir())
        .output()
        .expect("run scripts/build-deb.sh");
    assert!(
        out.status.success(),
        "{}",
        describe(&["scripts/build-deb.sh"], &out)
    );
    let path = stdout(&out).lines().last().unwrap_or_default().to_string();
    let path = root_dir().join(path.trim());
    assert!(path.is_file(), "build-deb.sh printed no package: {path:?}");
    path
}

fn deb_field(deb: &Path, field: &str) -> String {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .expect("dpkg-deb -f");
    assert!(
        out.status.success(),
        "{}",
        describe(&["dpkg-deb", "-f"], &out)
    );
    stdout(&out).trim().to_string()
}

/// What of the package is on the host: its dpkg status and its files. The
/// world's overlays must keep all of it as it was.
fn host_package_traces() -> String {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PKG])
        .output()
        .expect("dpkg-query");
    let mut s = format!(
        "dpkg-query: {} {}\n",
        status.status.success(),
        stdout(&status)
    );
    for p in [
        "/usr/bin/virt-tpm-state",
        PACKAGED_HOOK,
        "/usr/share/man/man1/virt-tpm-state.1.gz",
        "/usr/lib/systemd/system/virt-tpm-state-watch.service",
        WANTS,
        "/var/lib/dpkg/info/virt-tpm-state.list",
        "/etc/virt-tpm-state/config.toml",
        HOOK,
    ] {
        s.push_str(&format!(
            "{p}: {}\n",
            Path::new(p).symlink_metadata().is_ok()
        ));
    }
    s
}

fn host_check() -> String {
    let out = Command::new(world_sh())
        .arg("host-check")
        .output()
        .expect("world.sh host-check");
    assert!(out.status.success(), "{}", describe(&["host-check"], &out));
    stdout(&out)
}

/// dpkg (or another system command) inside the world, with a system PATH.
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

/// Whether `path` exists inside the world (the overlays are only visible there).
fn exists_in(w: &World, path: &str) -> bool {
    sys(w, &["test", "-e", path]).status.success() || sys(w, &["test", "-L", path]).status.success()
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

#[test]
fn deb_installs_runs_the_hook_removes_and_purges() {
    let test = "deb_installs_runs_the_hook_removes_and_purges";
    if !require_package_env(test) {
        return;
    }
    let host_before = (host_check(), host_package_traces());

    let deb = build_deb();
    let depends = deb_field(&deb, "Depends");
    for dep in ["libvirt0", "swtpm"] {
        assert!(
            depends.split(',').any(|d| d.trim().starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }
    let recommends = deb_field(&deb, "Recommends");
    assert!(
        recommends.contains("libvirt-daemon-system"),
        "Recommends: {recommends}"
    );
    let conffiles = Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .expect("dpkg-deb -I conffiles");
    assert_eq!(
        stdout(&conffiles).trim(),
        "/etc/virt-tpm-state/config.toml",
        "conffiles"
    );

    // Host A (development build): a VM with a secret in its TPM, stored
    // into the metadata; its persistent XML is what travels.
    let a = World::up("pkg-origin");
    a.install_hook();
    let vm = Vm::new("carried", Tpm::V2);
    vm_secret(&a, &vm, "packaged-secret");
    let ek = a.ek_pub(&vm);
    let stored = a.must_permall(&vm);
    let (_, xml) = a.dump(&vm.name, "carried.xml", true);

    // Host P: the package, installed with dpkg into the world's overlays.
    let p = World::up_env("pkg", &[("WORLD_OVERLAY", "/usr /etc /var")]);
    assert!(
        p.tree("/etc/libvirt/hooks/qemu.d").is_empty() && p.keys().is_empty(),
        "the package world starts with a hook or a key"
    );
    let deb_arg = deb.display().to_string();
    let log = must_sys(&p, &["dpkg", "--log=/dev/null", "-i", &deb_arg]);
    for said in [
        format!("installed {HOOK} (from {PACKAGED_HOOK})"),
        "created key".to_string(),
        "sent SIGHUP to libvirtd".to_string(),
    ] {
        assert!(log.contains(&said), "postinst did not say {said:?}:\n{log}");
    }
    let status = must_sys(&p, &["dpkg-query", "-W", "-f=${Status}", PKG]);
    assert_eq!(status, "install ok installed");
    // The hook libvirt runs is the packaged binary, wired by the postinst.
    assert_eq!(p.tree("/etc/libvirt/hooks/qemu.d"), vec!["virt-tpm-state"]);
    must_sys(&p, &["cmp", HOOK, PACKAGED_HOOK]);
    assert_eq!(p.keys().len(), 1, "the postinst made no key (or more)");
    let packaged_key = key_files(&p);
    assert_eq!(
        std::fs::read(p.host_path("/etc/virt-tpm-state/config.toml")).unwrap(),
        std::fs::read(root_dir().join("dist/deb/config.toml")).unwrap(),
        "the installed config is not dist/deb/config.toml"
    );
    assert!(exists_in(&p, WANTS), "the watch unit is not enabled");
    // The packaged unit names the installed binary and passes systemd's check.
    let unit = "/usr/lib/systemd/system/virt-tpm-state-watch.service";
    let out = sys(&p, &["systemd-analyze", "verify", unit]);
    if !out.status.success() || !out.stderr.is_empty() {
        p.fail(
            "systemd-analyze verify failed",
            &["systemd-analyze", "verify", unit],
            &out,
        );
    }
    // Installing again (the upgrade path: prerm upgrade, postinst configure
    // with the old version) keeps the hook wired and makes no second key.
    let log = must_sys(&p, &["dpkg", "--log=/dev/null", "-i", &deb_arg]);
    assert!(
        log.contains(&format!("installed {HOOK} (from {PACKAGED_HOOK})"))
            && !log.contains("created key"),
        "reinstall:\n{log}"
    );
    assert_eq!(p.tree("/etc/libvirt/hooks/qemu.d"), vec!["virt-tpm-state"]);
    assert_eq!(
        key_files(&p),
        packaged_key,
        "the reinstall changed the keys"
    );
    let version = must_sys(&p, &["virt-tpm-state", "--version"]);
    assert_eq!(
        version.trim(),
        format!("virt-tpm-state {}", env!("CARGO_PKG_VERSION"))
    );

    // Man pages render, from the index man-db's trigger built.
    for (page, has) in [
        (vec!["virt-tpm-state"], "virt-tpm-state-store(1)"),
        (vec!["virt-tpm-state-store"], "--allow-plaintext"),
        (vec!["8", "virt-tpm-state-hook"], "SUBOP"),
    ] {
        let mut args = vec!["env", "MANPAGER=cat", "MANWIDTH=100", "man"];
        args.extend(page.iter().copied());
        let out = sys(&p, &args);
        let out = p.check(&args, out);
        let text = stdout(&out);
        assert!(
            text.contains("NAME") && text.contains("SYNOPSIS") && text.contains(has),
            "man {page:?} rendered:\n{text}"
        );
        assert!(stderr(&out).is_empty(), "man {page:?}: {}", stderr(&out));
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
    for f in [
        "/usr/share/zsh/vendor-completions/_virt-tpm-state",
        "/usr/share/fish/vendor_completions.d/virt-tpm-state.fish",
    ] {
        assert!(exists_in(&p, f), "{f} not installed");
    }

    // The carried VM starts on P with its TPM: the installed hook restored it.
    a.copy_keys_to(&p);
    p.define_xml("carried.xml", &xml);
    assert!(!p.swtpm_uuid_dir_exists(&vm.uuid));
    p.start(&vm.name, true);
    assert!(
        p.must_permall(&vm) == stored,
        "the permall on the package host differs from the one stored on host A"
    );
    p.destroy(&vm.name);
    assert_eq!(p.read_secret(&vm), "packaged-secret");
    assert_eq!(p.ek_pub(&vm), ek);
    // The packaged CLI reads it (and the hook's post-stop store, run by
    // /usr/bin/virt-tpm-state, has settled).
    let shown = must_sys(&p, &["virt-tpm-state", "show", "--inactive", &vm.name]);
    assert!(!shown.is_empty());

    // The VM comes back from host A with a newer TPM: the hook restores it
    // and backs up the local state it replaces (a backup the removal must keep).
    a.write_secret(&vm, "newer-secret");
    let out = stdout(&a.must_vts(&["store", &vm.name]));
    assert!(out.contains("stored generation"), "store said: {out}");
    let (_, newer_xml) = a.dump(&vm.name, "newer.xml", true);
    p.define_xml("newer.xml", &newer_xml);
    p.start(&vm.name, true);
    p.destroy(&vm.name);
    assert_eq!(p.read_secret(&vm), "newer-secret");
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

    // Remove: the hook is unwired, the programs go, the config (a conffile),
    // keys, kept copies, backups and the metadata stay. With a broken config
    // too: it must not keep the hook wired.
    let config = p.host_path("/etc/virt-tpm-state/config.toml");
    let config_text = std::fs::read(&config).unwrap();
    p.append_config("no_such_key = 1");
    let out = p.vts(&["show", &vm.name]);
    assert_eq!(out.status.code(), Some(10), "the config is not broken");
    let log = must_sys(&p, &["dpkg", "--log=/dev/null", "-r", PKG]);
    std::fs::write(&config, &config_text).unwrap();
    assert!(
        log.contains(&format!("removed {HOOK}")) && log.contains("sent SIGHUP to libvirtd"),
        "prerm did not unwire the hook:\n{log}"
    );
    assert!(p.tree("/etc/libvirt/hooks/qemu.d").is_empty());
    for gone in ["/usr/bin/virt-tpm-state", PACKAGED_HOOK] {
        assert!(!exists_in(&p, gone), "{gone} left after remove");
    }
    let status = must_sys(&p, &["dpkg-query", "-W", "-f=${Status}", PKG]);
    assert_eq!(status, "deinstall ok config-files");
    assert!(p.host_path("/etc/virt-tpm-state/config.toml").is_file());
    assert_eq!(key_files(&p), keys, "keys changed on remove");
    assert_eq!(var_snapshot(&p), var_tree);
    assert_eq!(metadata(&p, &vm), meta, "metadata changed on remove");
    // libvirt starts the VM without the hook (nothing dangling in its way).
    p.start(&vm.name, true);
    p.must_virsh(&["destroy", &vm.name]);
    assert_eq!(var_snapshot(&p), var_tree);

    // Purge: the config and the unit's enablement go; keys, kept copies,
    // backups and metadata stay, and the postrm says so.
    let log = must_sys(&p, &["dpkg", "--log=/dev/null", "--purge", PKG]);
    assert!(
        log.contains("kept /etc/virt-tpm-state/keys"),
        "postrm did not say what it kept:\n{log}"
    );
    assert!(!sys(&p, &["dpkg-query", "-W", PKG]).status.success());
    assert!(!p.host_path("/etc/virt-tpm-state/config.toml").exists());
    assert!(!exists_in(&p, WANTS), "the watch unit is still enabled");
    assert_eq!(key_files(&p), keys, "keys changed on purge");
    assert_eq!(var_snapshot(&p), var_tree);
    assert_eq!(metadata(&p, &vm), meta, "metadata changed on purge");

    drop(p);
    drop(a);
    assert_eq!(
        (host_check(), host_package_traces()),
        host_before,
        "the host's libvirt dirs or package state changed"
    );
}

/// Defines `vm`, lets libvirt manufacture its TPM, plants `secret`, stores.
fn vm_secret(w: &World, vm: &Vm, secret: &str) {
    w.manufacture(vm);
    w.write_secret(vm, secret);
    let out = stdout(&w.must_vts(&["store", &vm.name]));
    assert!(out.contains("stored generation"), "store said: {out}");
}
