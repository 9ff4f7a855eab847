//! Hosts, not one shared secret (issue 21): three private libvirt hosts,
//! each with its own /etc/virt-tpm-state and age identity, and an owner
//! identity made by the real `rage-keygen`. A VM sealed for {A, B, owner}
//! round-trips on A and B, is refused on C with one line naming the
//! recipients and what to do; after adding C and `rekey` (which re-wraps
//! without re-encrypting) it starts on C with the same TPM secret; after
//! removing B, new stores no longer open on B; the owner recovers the
//! permall with `rage -d` + `gunzip`, byte-identical to the live one, and
//! with `extract --identity`. Also: a sealed file pasted into another
//! domain is refused, and an element sealed with a host key before
//! recipients existed still opens and converts with `rekey --to-recipients`.
//!
//! Heavy (three worlds, about a minute): run by scripts/test-hosts.sh.

#[macro_use]
mod common;

use base64::Engine as _;
use common::{env::Env, runner::output_with_stdin, world::*};
use std::process::Command;
use virt_tpm_state::format::NAMESPACE_URI;

/// `host-id`'s output (a recipients-file snippet) and the fingerprint in it.
fn host_id(w: &World) -> (String, String) {
    let snippet = stdout(&w.must_vts(&["host-id"]));
    let fp = snippet
        .split("(fingerprint ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no fingerprint in host-id output {snippet:?}"))
        .to_string();
    assert!(snippet.lines().any(|l| l.starts_with("age1")), "{snippet}");
    (snippet, fp)
}

/// The same recipient set on every host (as configuration management would).
fn set_recipients(worlds: &[&World], files: &[(&str, &str)]) {
    for w in worlds {
        let dir = w.host_path("/etc/virt-tpm-state/recipients.d");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(format!("{name}.txt")), text).unwrap();
        }
    }
}

/// The age files (decoded) of the element in `xml`, in document order.
fn age_files(xml: &str) -> Vec<Vec<u8>> {
    let info = virt_tpm_state::domain::parse_domain(xml.as_bytes(), NAMESPACE_URI).unwrap();
    let el = info.metadata.expect("an element");
    el.children
        .iter()
        .flat_map(|s| s.children.iter())
        .filter(|f| f.attr("encoding") == Some("gzip+age+base64"))
        .map(|f| {
            let compact: String = f.text.split_ascii_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .unwrap()
        })
        .collect()
}

/// What follows an age file's header: nonce and ciphertext.
fn age_payload(age: &[u8]) -> Vec<u8> {
    let mac = age
        .windows(5)
        .position(|w| w == b"\n--- ")
        .expect("a MAC line")
        + 1;
    let eol = mac + age[mac..].iter().position(|&b| b == b'\n').unwrap();
    age[eol + 1..].to_vec()
}

fn pipe(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let out = output_with_stdin(cmd, input);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The line `virsh start` shows for a refused start.
fn refused_start(w: &World, name: &str) -> String {
    let out = w.virsh(&["start", name]);
    assert!(
        !out.status.success(),
        "start of {name} on {} succeeded",
        w.name
    );
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("virt-tpm-state:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line from the hook:\n{err}");
    lines[0].to_string()
}

fn sorted_joined(fps: &[&str]) -> String {
    let mut v = fps.to_vec();
    v.sort_unstable();
    v.join(", ")
}

fn not_a_recipient_line(recipients: &[&str], host_fp: &str) -> String {
    format!(
        "cannot decrypt the TPM state in its metadata: file \"tpm2-00.permall\" is sealed for recipients {}; this host (recipient {host_fp}) is not one of them: `virt-tpm-state host-id` prints its recipient; add it to /etc/virt-tpm-state/recipients.d/ on a host that opens this VM and run `virt-tpm-state rekey` there",
        sorted_joined(recipients)
    )
}

#[test]
fn three_hosts_seal_add_revoke_and_owner_recovery() {
    require!(
        Env::Root,
        Env::Cmd("rage"),
        Env::Cmd("rage-keygen"),
        Env::Cmd("gunzip")
    );
    let a = World::up("hosts-a");
    let b = World::up("hosts-b");
    let c = World::up("hosts-c");
    for w in [&a, &b, &c] {
        w.install_hook();
    }
    let (a_id, a_fp) = host_id(&a);
    let (b_id, b_fp) = host_id(&b);
    let (c_id, c_fp) = host_id(&c);

    // The owner's identity, made by an independent age implementation.
    let owner_file = a.file("owner.txt");
    let out = Command::new("rage-keygen")
        .arg("-o")
        .arg(&owner_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "rage-keygen: {out:?}");
    let owner_text = std::fs::read_to_string(&owner_file).unwrap();
    let owner_recipient = owner_text
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .expect("rage-keygen's public key comment")
        .to_string();
    let owner_fp = virt_tpm_state::recipients::Fingerprint::of(&owner_recipient).to_string();
    let owner_snippet = format!("# owner (offline)\n{owner_recipient}\n");

    // An element sealed with A's host key before recipients existed.
    let old = Vm::new("old-keyed", Tpm::V2);
    a.manufacture(&old);
    a.write_secret(&old, "old-secret");
    a.must_vts(&["store", &old.name]);
    assert!(a.show_json(&old.name, true)["protection"]
        .as_str()
        .unwrap()
        .starts_with("virt-tpm-state:"));

    set_recipients(
        &[&a, &b, &c],
        &[("a", &a_id), ("b", &b_id), ("owner", &owner_snippet)],
    );
    let (vm, ek) = a.stored_vm("sealed-for-hosts", "hosts-secret");
    let j = a.show_json(&vm.name, true);
    assert_eq!(
        j["protection"],
        format!(
            "recipients:{}",
            sorted_joined(&[&a_fp, &b_fp, &owner_fp]).replace(", ", ",")
        ),
        "{j:#}"
    );
    let (_, xml) = a.dump(&vm.name, "vm-a.xml", true);
    assert!(xml.contains("encoding=\"gzip+age+base64\""), "{xml}");
    assert!(
        !xml.contains("age1"),
        "the element names recipients, not keys"
    );

    // Round trip on A, then on B.
    a.must_virsh(&["undefine", &vm.name]);
    a.define_xml("vm-a.xml", &xml);
    assert_eq!(a.secret_after_start(&vm), "hosts-secret");
    b.define_xml("vm-b.xml", &xml);
    assert_eq!(b.secret_after_start(&vm), "hosts-secret");
    assert_eq!(b.ek_pub(&vm), ek);
    let (_, xml_b) = b.dump(&vm.name, "vm-b2.xml", true);
    b.must_virsh(&["undefine", &vm.name]);
    b.define_xml("vm-b2.xml", &xml_b);
    assert_eq!(b.secret_after_start(&vm), "hosts-secret");

    // C is not a recipient: one line, naming the recipients and what to do.
    c.define_xml("vm-c.xml", &xml);
    let line = refused_start(&c, &vm.name);
    let expected = not_a_recipient_line(&[&a_fp, &b_fp, &owner_fp], &c_fp);
    assert!(line.contains(&expected), "line: {line}\nwanted: {expected}");
    eprintln!("C refused with: {line}");

    // Add C, rekey on A: the file keys are re-wrapped, nothing re-encrypted.
    set_recipients(
        &[&a, &b, &c],
        &[
            ("a", &a_id),
            ("b", &b_id),
            ("c", &c_id),
            ("owner", &owner_snippet),
        ],
    );
    let (_, before) = a.dump(&vm.name, "before-rekey.xml", true);
    let gen_before = a.show_json(&vm.name, true)["generation"].clone();
    let out = stdout(&a.must_vts(&["rekey", &vm.name]));
    assert!(out.contains("re-wrapped generation"), "{out}");
    let (_, after) = a.dump(&vm.name, "after-rekey.xml", true);
    let (old_files, new_files) = (age_files(&before), age_files(&after));
    assert_eq!(old_files.len(), new_files.len());
    for (o, n) in old_files.iter().zip(&new_files) {
        assert_ne!(o, n, "the header must change");
        assert_eq!(age_payload(o), age_payload(n), "ciphertext changed");
    }
    assert_eq!(a.show_json(&vm.name, true)["generation"], gen_before);

    c.must_virsh(&["undefine", &vm.name]);
    c.define_xml("vm-c2.xml", &after);
    assert_eq!(c.secret_after_start(&vm), "hosts-secret");
    assert_eq!(c.ek_pub(&vm), ek);

    // Remove B, rekey, then a new store on A: B no longer opens it.
    set_recipients(
        &[&a, &b, &c],
        &[("a", &a_id), ("c", &c_id), ("owner", &owner_snippet)],
    );
    let out = stdout(&a.must_vts(&["rekey", &vm.name]));
    assert!(out.contains("re-wrapped generation"), "{out}");
    a.write_secret(&vm, "after-revoke");
    a.must_store(&vm.name);
    let (saved, revoked_xml) = a.dump(&vm.name, "vm-revoked.xml", true);
    b.must_virsh(&["undefine", &vm.name]);
    b.define_xml("vm-b3.xml", &revoked_xml);
    let line = refused_start(&b, &vm.name);
    let expected = not_a_recipient_line(&[&a_fp, &c_fp, &owner_fp], &b_fp);
    assert!(line.contains(&expected), "line: {line}\nwanted: {expected}");

    // The owner recovers the permall with standard tools alone, and with
    // extract --identity.
    let live = a.must_permall(&vm);
    let files = age_files(&revoked_xml);
    let gz = pipe(
        Command::new("rage").arg("-d").arg("-i").arg(&owner_file),
        &files[0],
    );
    let permall = pipe(Command::new("gunzip").arg("-c"), &gz);
    assert!(
        permall == live,
        "rage -d | gunzip differs from the live permall"
    );
    let out_dir = a.file("extracted");
    let out = Command::new(VTS)
        .args(["extract", "--xml"])
        .arg(&saved)
        .arg("--out")
        .arg(&out_dir)
        .arg("--identity")
        .arg(&owner_file)
        .env("VIRT_TPM_STATE_ROOT", a.file("no-host-config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "extract --identity: {out:?}");
    assert!(std::fs::read(out_dir.join("tpm2-00.permall")).unwrap() == live);

    // Binding: the sealed file pasted into another domain is refused.
    let other = Vm::new("pasted", Tpm::V2);
    let meta_start = revoked_xml.find("<metadata>").expect("metadata");
    let meta_end = revoked_xml.find("</metadata>").unwrap() + "</metadata>".len();
    let meta = revoked_xml[meta_start..meta_end].replace(
        &format!("uuid=\"{}\"", vm.uuid),
        &format!("uuid=\"{}\"", other.uuid),
    );
    let pasted = other
        .xml()
        .replace("</domain>", &format!("{meta}</domain>"));
    a.define_xml("pasted.xml", &pasted);
    let line = refused_start(&a, &other.name);
    assert!(
        line.contains("is sealed for another domain or another file name"),
        "{line}"
    );

    // The element sealed with A's key before recipients still opens, and converts.
    let (_, old_xml) = a.dump(&old.name, "old.xml", true);
    a.must_virsh(&["undefine", &old.name]);
    a.define_xml("old.xml", &old_xml);
    a.start(&old.name, true);
    a.destroy(&old.name);
    assert_eq!(a.read_secret(&old), "old-secret");
    let out = stdout(&a.must_vts(&["rekey", "--to-recipients", &old.name]));
    assert!(out.contains("converted generation"), "{out}");
    assert!(a.show_json(&old.name, true)["protection"]
        .as_str()
        .unwrap()
        .starts_with("recipients:"));
}
