//! End-to-end test of issue 7: a UEFI domain's variable store (OVMF VARS)
//! travels in the same element as its TPM, in private libvirt worlds. Same
//! rules as tests/e2e.rs: root and the tools (here also `virt-fw-vars`, from
//! the PyPI package `virt-firmware`, installed by scripts/install-deps.sh),
//! or `SKIP` (a failure under `CI=true`).

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::process::Command;
use support::*;

/// A UEFI domain with a TPM 2.0: OVMF by firmware autoselection, without
/// Secure Boot (which would need SMM, missing under nested KVM here).
fn uefi_xml(vm: &Vm) -> String {
    let xml = domain_xml(&vm.name, &vm.uuid, Some(vm.tpm));
    let os = "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>\
<firmware><feature enabled='no' name='secure-boot'/></firmware></os><features><acpi/></features>";
    let out = xml.replacen(
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>",
        os,
        1,
    );
    assert_ne!(out, xml, "domain_xml changed its <os>");
    out
}

fn vars_path(vm: &Vm) -> String {
    format!("/var/lib/libvirt/qemu/nvram/{}_VARS.fd", vm.name)
}

fn fw_vars(args: &[&str]) -> String {
    let out = Command::new("virt-fw-vars")
        .args(args)
        .output()
        .expect("run virt-fw-vars");
    assert!(
        out.status.success(),
        "virt-fw-vars {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn has_fw_vars() -> bool {
    Command::new("virt-fw-vars")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn uefi_vars_travel_with_the_tpm() {
    if !require_env("uefi_vars_travel_with_the_tpm") {
        return;
    }
    if !has_fw_vars() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("virt-fw-vars missing (pip install virt-firmware; scripts/install-deps.sh)");
        }
        eprintln!("SKIP uefi_vars_travel_with_the_tpm: virt-fw-vars not installed");
        return;
    }
    let a = World::up("nvram-a");
    a.install_hook();
    let vm = Vm::new("efi1", Tpm::V2);
    a.define_xml("efi1.xml", &uefi_xml(&vm));
    // First start: libvirt manufactures the TPM and copies the VARS template.
    a.start(&vm.name, false);
    a.destroy(&vm.name);
    let vars_a = a.host_path(&vars_path(&vm));
    let meta = std::fs::metadata(&vars_a).expect("libvirt made no VARS file");
    assert_eq!(meta.len(), 540672, "not the 4M OVMF store");
    a.write_secret(&vm, "nvram-secret");
    let ek = a.ek_pub(&vm);

    // Change the VARS offline in a way the firmware keeps: a non-volatile
    // variable of shim's vendor GUID (OVMF leaves it alone).
    fw_vars(&[
        "--inplace",
        &vars_a.display().to_string(),
        "--set-shim-verbose",
    ]);
    let print = |path: &std::path::Path| fw_vars(&["-i", &path.display().to_string(), "-p"]);
    assert!(print(&vars_a).contains("SHIM_VERBOSE"));
    let stored_vars = std::fs::read(&vars_a).unwrap();
    let stored_permall = a.must_permall(&vm);

    let out = stdout(&a.must_vts(&["store", &vm.name]));
    assert!(out.contains("stored generation"), "store said: {out}");
    let (xml_path, xml) = a.dump(&vm.name, "efi1-stored.xml", true);
    let start = xml.find("<vts:state").expect("element in dumpxml");
    let end = xml.find("</vts:state>").unwrap() + "</vts:state>".len();
    let element_bytes = end - start;
    eprintln!(
        "element size for a TPM 2.0 ({} bytes permall) + OVMF VARS ({} bytes): {element_bytes} bytes",
        stored_permall.len(),
        stored_vars.len()
    );
    assert!(
        element_bytes < 32 * 1024,
        "element is {element_bytes} bytes"
    );
    let show = a.show_json(&vm.name, true);
    let files = show["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .any(|f| f["name"] == "VARS.fd" && f["section"] == "nvram" && f["size"] == 540672),
        "show lists no VARS.fd: {show}"
    );
    // extract writes both files, as stored.
    let out_dir = a.file("extracted");
    a.must_vts(&[
        "extract",
        "--xml",
        &xml_path.display().to_string(),
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_eq!(std::fs::read(out_dir.join("VARS.fd")).unwrap(), stored_vars);
    assert_eq!(
        std::fs::read(out_dir.join("tpm2-00.permall")).unwrap(),
        stored_permall
    );

    a.must_virsh(&["undefine", "--nvram", &vm.name]);
    assert!(!vars_a.exists(), "undefine --nvram left the VARS file");

    // A fresh host with the same key defines the saved XML and starts it
    // paused: the VARS are the stored bytes before any firmware ran.
    let b = World::up("nvram-b");
    a.copy_keys_to(&b);
    b.install_hook();
    let xml_b = b.file("efi1.xml");
    std::fs::write(&xml_b, &xml).unwrap();
    b.must_virsh(&["define", &xml_b.display().to_string()]);
    b.start(&vm.name, true);
    let vars_b = b.host_path(&vars_path(&vm));
    assert_eq!(
        std::fs::read(&vars_b).unwrap(),
        stored_vars,
        "the VARS file differs from the stored one\n{}",
        b.log_tail(30)
    );
    let m = std::fs::metadata(&vars_b).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    let qemu = nix::unistd::User::from_name("libvirt-qemu")
        .ok()
        .flatten()
        .map_or(0, |u| u.uid.as_raw());
    assert_eq!(m.uid(), qemu, "VARS not owned by the qemu user");
    assert_eq!(b.must_permall(&vm), stored_permall);
    b.destroy(&vm.name);
    assert_eq!(b.read_secret(&vm).trim(), "nvram-secret");
    assert_eq!(b.ek_pub(&vm), ek);

    // A plain start runs the firmware: the variable survives it.
    b.start(&vm.name, false);
    std::thread::sleep(std::time::Duration::from_secs(5));
    b.destroy(&vm.name);
    assert!(
        print(&vars_b).contains("SHIM_VERBOSE"),
        "the firmware dropped the variable"
    );
    assert_eq!(b.read_secret(&vm).trim(), "nvram-secret");
}
