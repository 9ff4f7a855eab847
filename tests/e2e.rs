//! End-to-end tests against real libvirt, QEMU and swtpm, each in its own
//! private libvirt world(s) (tests/e2e/world.sh). Run as root:
//! `cargo test --test e2e -- --nocapture`. Without root or the tools they
//! print `SKIP` and pass, unless `CI=true`.

mod support;

use std::time::{Duration, Instant};
use support::*;

/// Defines `vm`, lets libvirt manufacture its TPM, plants `secret`, and
/// stores the state into the metadata with `store`. Returns the EK fingerprint.
fn vm_with_secret(w: &World, vm: &Vm, secret: &str) -> String {
    w.manufacture(vm);
    w.write_secret(vm, secret);
    let ek = w.ek_pub(vm);
    let out = stdout(&w.must_vts(&["store", &vm.name]));
    assert!(out.contains("stored generation"), "store said: {out}");
    ek
}

/// The metadata of the persistent config holds exactly the local state.
fn assert_metadata_is_local(w: &World, vm: &Vm) -> serde_json::Value {
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["valid"], true, "{j:#}");
    assert_eq!(j["digest"], j["local"]["digest"], "{j:#}");
    assert_eq!(j["local"]["matches"], true, "{j:#}");
    j
}

#[test]
fn roundtrip_same_host() {
    if !require_env("roundtrip_same_host") {
        return;
    }
    let w = World::up("roundtrip");
    w.install_hook();
    let vm = Vm::new("vm1", Tpm::V2);
    let ek = vm_with_secret(&w, &vm, "hunter3");
    assert_metadata_is_local(&w, &vm);

    // A store on a running domain: two settle reads ~1 s apart, live+config.
    w.start(&vm.name, false);
    let t = Instant::now();
    let out = stdout(&w.must_vts(&["store", &vm.name]));
    let took = t.elapsed();
    assert!(
        out.contains("stored generation") || out.contains("unchanged"),
        "store (running) said: {out}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "settle took only {took:?}"
    );
    let live = w.show_json(&vm.name, false);
    assert_eq!(live["local"]["matches"], true, "{live:#}");
    w.destroy(&vm.name);
    assert_metadata_is_local(&w, &vm);

    let stored = w.must_permall(&vm);
    let (dump, _) = w.dump(&vm.name, "dump.xml", false);
    w.must_virsh(&["undefine", &vm.name]);
    assert!(
        !w.swtpm_uuid_dir_exists(&vm.uuid),
        "undefine left /var/lib/libvirt/swtpm/{}",
        vm.uuid
    );
    w.must_virsh(&["define", &dump.display().to_string()]);
    w.start(&vm.name, true);
    assert!(
        w.must_permall(&vm) == stored,
        "restored permall differs from the stored one"
    );
    w.destroy(&vm.name);
    assert_eq!(w.read_secret(&vm), "hunter3");
    assert_eq!(w.ek_pub(&vm), ek);
}

#[test]
fn define_on_second_host() {
    if !require_env("define_on_second_host") {
        return;
    }
    let a = World::up("host-a");
    a.install_hook();
    let vm = Vm::new("mover", Tpm::V2);
    let ek = vm_with_secret(&a, &vm, "moved-secret");
    let stored = a.must_permall(&vm);
    let (_, xml) = a.dump(&vm.name, "dump.xml", false);

    let b = World::up("host-b");
    b.install_hook();
    assert!(!b.swtpm_uuid_dir_exists(&vm.uuid));
    b.define_xml("dump.xml", &xml);
    b.start(&vm.name, true);
    assert!(
        b.must_permall(&vm) == stored,
        "permall restored on host B differs from the one stored on host A"
    );
    b.destroy(&vm.name);
    assert_eq!(b.read_secret(&vm), "moved-secret");
    assert_eq!(b.ek_pub(&vm), ek);
}

#[test]
fn transient_domain() {
    if !require_env("transient_domain") {
        return;
    }
    let a = World::up("trans-a");
    a.install_hook();
    let vm = Vm::new("trans", Tpm::V2);
    let ek = vm_with_secret(&a, &vm, "transient-secret");
    let stored = a.must_permall(&vm);
    let (_, xml) = a.dump(&vm.name, "dump.xml", false);
    drop(a);

    let b = World::up("trans-b");
    b.install_hook();
    let path = b.file("dump.xml");
    std::fs::write(&path, &xml).unwrap();
    b.must_virsh(&["create", "--paused", &path.display().to_string()]);
    assert!(
        b.must_permall(&vm) == stored,
        "permall restored for the transient domain differs from the stored one"
    );
    b.destroy(&vm.name);
    assert!(
        !b.swtpm_uuid_dir_exists(&vm.uuid),
        "libvirt kept the transient domain's swtpm dir"
    );
    let kept = b.host_path(&vm.kept_dir()).join("tpm2-00.permall");
    assert!(kept.is_file(), "no kept copy at {}", kept.display());
    assert_eq!(b.read_secret_at(&vm.kept_dir()), "transient-secret");
    assert_eq!(b.ek_pub_at(&vm.kept_dir(), Tpm::V2), ek);
}

/// Local state changed since the last store; the old XML is defined over
/// the domain again: the newer local state is kept (M == J, L != J).
fn local_newer(post_stop_store: bool, tag: &str) {
    let w = World::up(tag);
    w.install_hook();
    if !post_stop_store {
        w.append_config("store_after_stop = false");
    }
    let vm = Vm::new("newer", Tpm::V2);
    let ek = vm_with_secret(&w, &vm, "old-secret");
    let (old, _) = w.dump(&vm.name, "old.xml", true);
    w.write_secret(&vm, "newer-secret");
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["local"]["matches"], false, "{j:#}");

    w.must_virsh(&["define", &old.display().to_string()]);
    w.start(&vm.name, true);
    w.destroy(&vm.name);
    assert_eq!(w.read_secret(&vm), "newer-secret");
    assert_eq!(w.ek_pub(&vm), ek);
    let backups = w.host_path(&format!("/var/lib/virt-tpm-state/backups/{}", vm.uuid));
    assert!(!backups.exists(), "a backup was made: nothing was replaced");
    let j = w.show_json(&vm.name, true);
    if post_stop_store {
        // The post-stop store wrote the newer state into the config by itself.
        assert_eq!(j["local"]["matches"], true, "{j:#}");
        assert_eq!(j["generation"], 3, "{j:#}");
    } else {
        assert_eq!(j["local"]["matches"], false, "{j:#}");
        // Still newer after undefine: the kept copy is put back.
        w.must_virsh(&["undefine", &vm.name]);
        assert!(!w.swtpm_uuid_dir_exists(&vm.uuid));
        w.must_virsh(&["define", &old.display().to_string()]);
        w.start(&vm.name, true);
        w.destroy(&vm.name);
        assert_eq!(w.read_secret(&vm), "newer-secret");
        assert!(!backups.exists(), "a backup was made: nothing was replaced");
    }
}

#[test]
fn local_newer_is_kept() {
    if !require_env("local_newer_is_kept") {
        return;
    }
    local_newer(true, "newer");
}

#[test]
fn local_newer_is_kept_without_post_stop_store() {
    if !require_env("local_newer_is_kept_without_post_stop_store") {
        return;
    }
    local_newer(false, "newer-nostore");
}
