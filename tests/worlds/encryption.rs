//! End-to-end tests of the element's envelope encryption (issue 6), in
//! private libvirt worlds: what a read-only connection sees, key rotation,
//! and the store policy without a key. Same rules as tests/worlds/e2e.rs: root and
//! the tools, or `SKIP` (a failure under `CI=true`).

use crate::common::{env::Env, world::*};
use base64::Engine as _;
use std::io::Read;

/// Every run of base64 characters (16 or more) in `text`, decoded where it
/// decodes: attribute values and element text alike.
fn base64_blobs(text: &str) -> Vec<Vec<u8>> {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    let mut out = Vec::new();
    for run in text.split(|c: char| !is_b64(c)) {
        if run.len() < 16 {
            continue;
        }
        let e = base64::engine::general_purpose::STANDARD;
        if let Ok(b) = e.decode(run) {
            out.push(b);
        }
        // Also with trailing characters trimmed to a multiple of 4.
        let cut = &run[..run.len() - run.len() % 4];
        if let Ok(b) = e.decode(cut) {
            out.push(b);
        }
    }
    out
}

fn gunzip(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn readonly_dumpxml_reveals_no_tpm_state() {
    require!(Env::Libvirt);
    let w = World::with_hook("enc-ro");
    assert_eq!(w.keys().len(), 1, "install must create one host key");
    let (vm, ek) = w.stored_vm("secretive", "ro-secret");
    let raw = w.must_permall(&vm);
    let gz = virt_tpm_state::format::gzip_deterministic(&raw);

    // What any local user sees: a read-only connection's dumpxml.
    let ro = stdout(&w.must_virsh(&["-r", "dumpxml", &vm.name]));
    assert!(
        ro.contains("encoding=\"gzip+chacha20poly1305+base64\""),
        "the element is not encrypted:\n{ro}"
    );
    assert!(!ro.contains("encoding=\"gzip+base64\""));
    let blobs = base64_blobs(&ro);
    assert!(
        blobs.len() >= 3,
        "expected the ciphertext, nonce and wrapped key among the base64 runs"
    );
    for b in &blobs {
        assert!(
            !contains(b, &raw[16..64]),
            "a base64 run decodes to the raw state"
        );
        assert!(b != &gz, "a base64 run is the state's gzip");
        assert!(
            !contains(b, &gz[10..60]),
            "a base64 run contains the state's gzip stream"
        );
        if let Some(unzipped) = gunzip(b) {
            assert!(
                !contains(&unzipped, &raw[16..64]),
                "a run gunzips to the state"
            );
        }
    }
    assert!(!contains(ro.as_bytes(), &raw[16..64]));

    // Root on the host with the key restores exactly the stored state.
    w.redefine(&vm, "ro.xml", false);
    w.assert_restores(&vm, &raw, "ro-secret", Some(&ek), "root with the key");
}

#[test]
fn key_rotation_rekey_then_old_key_removed() {
    require!(Env::Libvirt);
    let w = World::with_hook("enc-rotate");
    let (vm, ek) = w.stored_vm("rotated", "rotate-secret");
    let key1 = w.keys().pop().expect("a key");
    let j = w.show_json(&vm.name, true);
    let id1 = key_id(&key1).to_string();
    assert_eq!(j["protection"], format!("virt-tpm-state:{id1}"), "{j:#}");

    // Key 2 (file names sort by creation time: wait for a new second).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = stdout(&w.must_vts(&["keygen"]));
    assert!(out.contains("created key"), "{out}");
    let keys = w.keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let key2 = keys.last().unwrap().clone();
    assert_ne!(key1, key2);
    let id2 = key_id(&key2).to_string();

    let out = stdout(&w.must_vts(&["rekey", &vm.name]));
    assert!(out.contains("re-encrypted generation"), "{out}");
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["protection"], format!("virt-tpm-state:{id2}"), "{j:#}");
    let gen_before = j["generation"].clone();
    // rekey changes the protection, not the state.
    assert_eq!(j["local"]["matches"], true, "{j:#}");
    let out = stdout(&w.must_vts(&["rekey", &vm.name]));
    assert!(out.contains("already encrypted"), "{out}");

    // Key 1 gone; the VM re-created from its XML still gets its TPM.
    std::fs::remove_file(w.host_path("/etc/virt-tpm-state/keys").join(&key1)).unwrap();
    let (_, xml) = w.dump(&vm.name, "rotated.xml", true);
    w.must_virsh(&["undefine", &vm.name]);
    w.define_xml("rotated.xml", &xml);
    assert_eq!(w.secret_after_start(&vm), "rotate-secret");
    assert_eq!(w.ek_pub(&vm), ek);
    // The start changed nothing that needed a new generation, or a later one.
    assert!(w.show_json(&vm.name, true)["generation"].as_u64() >= gen_before.as_u64());
}

#[test]
fn store_without_a_key_refuses_unless_plaintext_is_allowed() {
    require!(Env::Libvirt);
    let w = World::with_hook("enc-nokey");
    for k in w.keys() {
        std::fs::remove_file(w.host_path("/etc/virt-tpm-state/keys").join(k)).unwrap();
    }
    w.append_config("store_after_stop = false");
    let vm = Vm::new("nokey", Tpm::V2);
    w.manufacture(&vm);
    w.write_secret(&vm, "plain-secret");

    let out = w.vts(&["store", &vm.name]);
    assert_eq!(
        out.status.code(),
        Some(19),
        "{}",
        describe(&["store"], &out)
    );
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line expected:\n{err}");
    assert!(
        err.contains("keygen") && err.contains("allow-plaintext"),
        "{err}"
    );
    assert_eq!(
        w.show_json(&vm.name, true)["present"],
        false,
        "nothing written"
    );

    let out = stdout(&w.must_vts(&["store", "--allow-plaintext", &vm.name]));
    assert!(out.contains("stored generation 1"), "{out}");
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["protection"], "none", "{j:#}");
    assert_eq!(j["valid"], true, "{j:#}");
}
