//! End-to-end test of issue 7: a UEFI domain's variable store (OVMF VARS)
//! travels in the same element as its TPM, in private libvirt worlds. Same
//! rules as tests/worlds/e2e.rs: root and the tools (here also `virt-fw-vars`, from
//! the PyPI package `virt-firmware`, installed by scripts/install-deps.sh),
//! or `SKIP` (a failure under `CI=true`).

use crate::common::{env::Env, world::*};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

/// After a restore on `w` (the VM running paused): the TPM holds `secret`
/// and the endorsement key `ek`; then the guest's firmware runs for `secs`
/// seconds and the VM is stopped again.
fn secret_kept_then_boot(w: &World, vm: &Vm, secret: &str, ek: &str, secs: u64) {
    w.destroy(&vm.name);
    assert_eq!(w.read_secret(vm).trim(), secret);
    assert_eq!(w.ek_pub(vm), ek);
    w.start(&vm.name, false);
    std::thread::sleep(std::time::Duration::from_secs(secs));
    w.destroy(&vm.name);
}

#[test]
fn uefi_vars_travel_with_the_tpm() {
    require!(Env::Libvirt, Env::FwVars);
    let a = World::with_hook("nvram-a");
    let vm = Vm::new("efi1", Tpm::V2);
    a.define_xml("efi1.xml", &uefi_xml(&a, &vm));
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

    a.must_store(&vm.name);
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
    // A plain start runs the firmware: the variable survives it.
    secret_kept_then_boot(&b, &vm, "nvram-secret", &ek, 5);
    assert!(
        print(&vars_b).contains("SHIM_VERBOSE"),
        "the firmware dropped the variable"
    );
    assert_eq!(b.read_secret(&vm).trim(), "nvram-secret");
}

// ================================================================ issue 16: root-safe filesystem layer

/// `fw_vars` present, else SKIP (a failure under CI=true), as above.
/// uid and gid of `user`/`group` as the world's root knows them (the host,
/// or the libvirt 11.3 root of VTS_WORLD_ROOTFS).
fn ids_in(w: &World, user: &str, group: &str) -> (u32, u32) {
    let uid = stdout(&w.must(&["id", "-u", user])).trim().parse().unwrap();
    let g = stdout(&w.must(&["getent", "group", group]));
    let gid = g.split(':').nth(2).unwrap().trim().parse().unwrap();
    (uid, gid)
}

/// `uid:gid 0mode` of a path inside the world, not following a link.
fn stat_in(w: &World, abs: &str) -> String {
    let m = std::fs::symlink_metadata(w.host_path(abs))
        .unwrap_or_else(|e| panic!("stat {abs}: {e}\n{}", w.log_tail(30)));
    om(m.uid(), m.gid(), m.mode() & 0o7777)
}

fn om(uid: u32, gid: u32, mode: u32) -> String {
    format!("{uid}:{gid} {mode:04o}")
}

/// Changes the VARS file (offline, as the firmware would keep it) and, with
/// a secret, the TPM: the state a guest leaves behind. Returns the EK.
fn change_state(w: &World, vm: &Vm, vars: &str, secret: Option<&str>) -> String {
    if let Some(secret) = secret {
        w.write_secret(vm, secret);
    }
    fw_vars(&[
        "--inplace",
        &w.host_path(vars).display().to_string(),
        "--set-shim-verbose",
    ]);
    w.ek_pub(vm)
}

fn vars_file_in(json: &serde_json::Value) -> Option<String> {
    json["files"]
        .as_array()?
        .iter()
        .find(|f| f["name"] == "VARS.fd" && f["section"] == "nvram")
        .and_then(|f| f["sha256"].as_str().map(str::to_string))
}

/// The hook as an admin's wrapper may start it: under the umask written in
/// /etc/libvirt/hooks/vts-umask. The installed copy moves beside qemu.d/
/// (libvirt runs only qemu and qemu.d/*), a script takes its place.
fn wrap_hook_in_umask(w: &World) {
    let hook = w.host_path("/etc/libvirt/hooks/qemu.d/virt-tpm-state");
    std::fs::rename(&hook, w.host_path("/etc/libvirt/hooks/vts-real-hook")).unwrap();
    std::fs::write(
        &hook,
        "#!/bin/sh\numask \"$(cat /etc/libvirt/hooks/vts-umask)\"\n\
         exec /etc/libvirt/hooks/vts-real-hook \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    w.reload();
}

/// Issue 16: whatever umask the hook is started with, a fresh
/// /var/lib/libvirt/swtpm, the `<uuid>` dir, the state dir and its files,
/// and the VARS file get libvirt's owners and modes, the VM starts with its
/// TPM and VARS from the metadata, and the post-stop store still stores.
/// One VM, defined again from its metadata under each umask in turn.
#[test]
fn umask_wrapped_hook_starts_uefi_tpm_vms() {
    require!(Env::Libvirt, Env::FwVars);
    let w = World::with_hook("nvram-umask");
    wrap_hook_in_umask(&w);
    let (tss_uid, tss_gid) = ids_in(&w, "tss", "tss");
    let (qemu_uid, qemu_gid) = ids_in(&w, "libvirt-qemu", "libvirt-qemu");
    let umask_file = w.host_path("/etc/libvirt/hooks/vts-umask");
    std::fs::write(&umask_file, "022").unwrap();
    let vm = Vm::new("umasked", Tpm::V2);
    let vars = vars_path(&vm);
    w.define_xml("umasked.xml", &uefi_xml(&w, &vm));
    w.start(&vm.name, false);
    w.destroy(&vm.name);
    // The TPM as libvirt made it (its EK and bytes are checked), the VARS
    // changed.
    let ek = change_state(&w, &vm, &vars, None);
    w.must_store(&vm.name);
    for umask in ["000", "022", "077"] {
        let what = format!("umask {umask}");
        std::fs::write(&umask_file, umask).unwrap();
        // What the metadata holds is the local state (the post-stop store
        // of the run before, under the umask before, stored it).
        let j = w.show_json(&vm.name, true);
        assert_eq!(j["local"]["matches"], true, "{what}: {j:#}");
        let stored_vars = std::fs::read(w.host_path(&vars)).unwrap();
        let stored_permall = w.must_permall(&vm);
        let (dump, _) = w.dump(&vm.name, &format!("umasked-{umask}.xml"), true);
        w.must_virsh(&["undefine", "--nvram", &vm.name]);
        // A fresh host: no swtpm base at all, the hook makes it.
        std::fs::remove_dir_all(w.host_path("/var/lib/libvirt/swtpm")).unwrap();
        w.must_virsh(&["define", &dump.display().to_string()]);
        w.start(&vm.name, true);
        let base = "/var/lib/libvirt/swtpm".to_string();
        let uuid_dir = format!("{base}/{}", vm.uuid);
        let permall = format!("{}/{}", vm.state_dir(), vm.tpm.permall());
        for (p, want) in [
            (&base, om(0, 0, 0o711)),
            (&uuid_dir, om(0, 0, 0o711)),
            (&vm.state_dir(), om(tss_uid, tss_gid, 0o700)),
            (&permall, om(tss_uid, tss_gid, 0o600)),
            (&vars, om(qemu_uid, qemu_gid, 0o600)),
        ] {
            assert_eq!(
                stat_in(&w, p),
                want,
                "{what}: owner and mode of {p}\n{:#?}\n{}",
                w.tree("/var/lib/libvirt"),
                w.log_tail(30)
            );
        }
        assert!(w.must_permall(&vm) == stored_permall, "{what}: permall");
        assert!(
            std::fs::read(w.host_path(&vars)).unwrap() == stored_vars,
            "{what}: VARS"
        );
        // And it runs (the guest itself may stop on KVM errors under
        // nested virtualization here: the domain stays active either way).
        w.must_virsh(&["resume", &vm.name]);
        let state = stdout(&w.must_virsh(&["domstate", &vm.name]));
        assert!(
            ["running", "paused"].contains(&state.trim()),
            "{what}: {state}\n{}",
            w.log_tail(30)
        );
        w.destroy(&vm.name);
        assert_eq!(w.ek_pub(&vm), ek, "{what}");
    }
    let j = w.show_json(&vm.name, true);
    assert_eq!(j["local"]["matches"], true, "after the last stop: {j:#}");
}

/// `dump` without its `<nvram …>…</nvram>` (or `<nvram …/>`): firmware
/// autoselection again, as a manager that never wrote a path defines it.
fn strip_nvram(xml: &str) -> String {
    let Some(start) = xml.find("<nvram") else {
        return xml.to_string();
    };
    let rest = &xml[start..];
    let tag_end = rest.find('>').unwrap();
    let end = if rest[..tag_end].ends_with('/') {
        start + tag_end + 1
    } else {
        start + rest.find("</nvram>").unwrap() + "</nvram>".len()
    };
    format!("{}{}", &xml[..start], &xml[end..])
}

/// Issue 16: /var/lib/libvirt relocated by the administrator (a link made
/// by root, inside the world only: world.sh WORLD_LIBVIRT_LIB_LINK). UEFI+TPM
/// domains with and without an explicit `<nvram>` path store after stop
/// (the hook's post-stop store) and start again from the metadata alone.
#[test]
fn relocated_var_lib_libvirt_starts_and_stores() {
    require!(Env::Libvirt, Env::FwVars);
    let host_before = host_fingerprint();
    {
        let w = World::up_env("nvram-link", &[("WORLD_LIBVIRT_LIB_LINK", "1")]);
        let link = stdout(&w.must(&["stat", "-c", "%F %u %N", "/var/lib/libvirt"]));
        assert!(
            link.starts_with("symbolic link 0 ") && link.contains("/var/lib/libvirt-real"),
            "/var/lib/libvirt in the world is not root's link: {link}"
        );
        w.install_hook();
        let (qemu_uid, qemu_gid) = ids_in(&w, "libvirt-qemu", "libvirt-qemu");
        for explicit in [false, true] {
            let what = if explicit {
                "explicit <nvram>"
            } else {
                "firmware autoselection, no <nvram> path"
            };
            let vm = Vm::new(if explicit { "link-expl" } else { "link-auto" }, Tpm::V2);
            let vars = if explicit {
                format!("/var/lib/libvirt/qemu/nvram/{}-explicit.fd", vm.name)
            } else {
                vars_path(&vm)
            };
            let mut xml = uefi_xml(&w, &vm);
            if explicit {
                xml = xml.replacen("</os>", &format!("<nvram>{vars}</nvram></os>"), 1);
            }
            w.define_xml(&format!("{}.xml", vm.name), &xml);
            // First run: libvirt makes TPM and VARS; the post-stop store
            // stores both.
            w.start(&vm.name, false);
            w.destroy(&vm.name);
            let j = w.show_json(&vm.name, true);
            assert_eq!(
                j["present"],
                true,
                "{what}: nothing stored after the first stop\n{j:#}\n{}",
                w.log_tail(40)
            );
            assert!(vars_file_in(&j).is_some(), "{what}: no VARS stored\n{j:#}");
            let gen1 = j["generation"].as_u64().unwrap();

            // The guest changes TPM and VARS; it starts (the newer local
            // state is kept) and stops: the post-stop store stores it.
            let secret = format!("relocated, {what}");
            let ek = change_state(&w, &vm, &vars, Some(&secret));
            let changed_vars = std::fs::read(w.host_path(&vars)).unwrap();
            let changed_permall = w.must_permall(&vm);
            w.start(&vm.name, true);
            assert!(
                w.must_permall(&vm) == changed_permall,
                "{what}: the newer local TPM was replaced\n{}",
                w.log_tail(30)
            );
            w.destroy(&vm.name);
            let j = w.show_json(&vm.name, true);
            assert_eq!(j["valid"], true, "{what}: {j:#}");
            assert!(
                j["generation"].as_u64().unwrap() > gen1,
                "{what}: the post-stop store stored nothing new\n{j:#}\n{}",
                w.log_tail(40)
            );
            assert_eq!(j["local"]["matches"], true, "{what}: {j:#}");
            assert_eq!(
                vars_file_in(&j),
                Some(sha256_hex(&changed_vars)),
                "{what}: stored VARS\n{j:#}"
            );

            // From the metadata alone.
            let (_, dump) = w.dump(&vm.name, &format!("{}-stored.xml", vm.name), true);
            let dump = if explicit {
                assert!(dump.contains(&vars), "{what}: {dump}");
                dump
            } else {
                strip_nvram(&dump)
            };
            w.must_virsh(&["undefine", "--nvram", &vm.name]);
            assert!(!w.host_path(&vars).exists(), "{what}: VARS left");
            assert!(!w.swtpm_uuid_dir_exists(&vm.uuid), "{what}: state left");
            w.define_xml(&format!("{}-again.xml", vm.name), &dump);
            w.start(&vm.name, true);
            assert!(
                w.must_permall(&vm) == changed_permall,
                "{what}: restored permall differs\n{}",
                w.log_tail(30)
            );
            assert!(
                std::fs::read(w.host_path(&vars)).unwrap() == changed_vars,
                "{what}: restored VARS differ"
            );
            assert_eq!(stat_in(&w, &vars), om(qemu_uid, qemu_gid, 0o600), "{what}");
            w.destroy(&vm.name);
            assert_eq!(w.read_secret(&vm), secret, "{what}");
            assert_eq!(w.ek_pub(&vm), ek, "{what}");
            let j = w.show_json(&vm.name, true);
            assert_eq!(j["local"]["matches"], true, "{what}: {j:#}");
        }
    }
    assert_eq!(
        host_fingerprint(),
        host_before,
        "the host's libvirt dirs changed"
    );
    let host_lib = std::fs::symlink_metadata("/var/lib/libvirt").unwrap();
    assert!(
        host_lib.is_dir(),
        "the host's /var/lib/libvirt is no longer a dir"
    );
    assert!(
        std::fs::symlink_metadata("/var/lib/libvirt-real").is_err(),
        "/var/lib/libvirt-real appeared on the host"
    );
}

// ================================================================ issue 18: one "matches" rule

/// A UEFI domain (as [`uefi_xml`]) with or without a TPM.
fn uefi_xml_with(w: &World, vm: &Vm, tpm: bool) -> String {
    let with = uefi_xml(w, vm);
    if tpm {
        return with;
    }
    let tpm_dev = domain_xml(&vm.name, &vm.uuid, Some(vm.tpm));
    let start = tpm_dev.find("<tpm ").unwrap();
    let end = tpm_dev.find("</tpm>").unwrap() + "</tpm>".len();
    with.replacen(&tpm_dev[start..end], "", 1)
}

/// What `show`, `status` and `restore` say of one domain's local state
/// against its config metadata: `(show matches, status in_sync, restore
/// left it as it is)`.
fn verdicts(w: &World, name: &str) -> (bool, bool, bool) {
    let show = w.show_json(name, true);
    let matches = show["local"]["matches"]
        .as_bool()
        .unwrap_or_else(|| panic!("{name}: show has no local.matches: {show:#}"));
    let status: serde_json::Value =
        serde_json::from_slice(&w.must_vts(&["status", "--json"]).stdout).unwrap();
    let row = status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == name)
        .unwrap_or_else(|| panic!("{name}: not in status: {status:#}"))
        .clone();
    let out = stdout(&w.must_vts(&["restore", name]));
    (matches, row["in_sync"] == true, out.contains("left "))
}

/// `show`, `status` and `restore` agree on whether the local state matches
/// the metadata, for TPM-only, TPM+UEFI and UEFI-only domains, stored and
/// changed since; and an element holding VARS for a domain without UEFI
/// matches on its TPM alone (show used to count the VARS section, status
/// too, while restore rightly ignored it). The watch daemon compares with
/// the same rule (`Carried::sections` + `format::declared_digest`, unit
/// tested against the state digest).
#[test]
fn show_status_and_restore_agree_on_matches() {
    require!(Env::Libvirt, Env::FwVars);
    let w = World::up("agree");
    w.append_config("nvram_without_tpm = true");
    w.install_hook();
    let tpm_only = Vm::new("agree-tpm", Tpm::V2);
    let tpm_uefi = Vm::new("agree-both", Tpm::V2);
    let uefi_only = Vm::new("agree-uefi", Tpm::V2);
    w.define_xml(
        "t.xml",
        &domain_xml(&tpm_only.name, &tpm_only.uuid, Some(Tpm::V2)),
    );
    w.define_xml("b.xml", &uefi_xml_with(&w, &tpm_uefi, true));
    w.define_xml("u.xml", &uefi_xml_with(&w, &uefi_only, false));
    let all = [&tpm_only, &tpm_uefi, &uefi_only];
    for vm in all {
        w.start(&vm.name, true);
        w.destroy(&vm.name);
        w.must_vts(&["store", &vm.name]);
    }
    for vm in all {
        assert_eq!(
            verdicts(&w, &vm.name),
            (true, true, true),
            "{}: stored, nothing changed since",
            vm.name
        );
    }
    // Change each: the TPM where there is one, the VARS where there are.
    w.write_secret(&tpm_only, "agree-1");
    w.write_secret(&tpm_uefi, "agree-2");
    let uefi_vars = w.host_path(&vars_path(&uefi_only)).display().to_string();
    fw_vars(&["--inplace", &uefi_vars, "--set-shim-verbose"]);
    for vm in all {
        let (show, status, restore) = verdicts(&w, &vm.name);
        assert_eq!(
            (show, status),
            (false, false),
            "{}: changed since the store",
            vm.name
        );
        // The newer local state is kept (not restored over) either way.
        assert!(restore, "{}: restore replaced a newer local state", vm.name);
    }
    for vm in all {
        w.must_vts(&["store", &vm.name]);
        assert_eq!(verdicts(&w, &vm.name), (true, true, true), "{}", vm.name);
    }
    // The TPM-only domain's element now also holds a VARS section (packed
    // from its kept state and another domain's VARS): not carried here, so
    // neither compared nor restored.
    let (xml_path, _) = w.dump(&tpm_only.name, "t-now.xml", true);
    let out = w.must_vts(&[
        "pack",
        "--kept",
        &tpm_only.uuid,
        "--vars",
        &w.host_path(&vars_path(&tpm_uefi)).display().to_string(),
        "--into",
        &xml_path.display().to_string(),
    ]);
    let with_vars = w.file("t-with-vars.xml");
    std::fs::write(&with_vars, &out.stdout).unwrap();
    w.must_virsh(&["define", &with_vars.display().to_string()]);
    let show = w.show_json(&tpm_only.name, true);
    assert!(
        show["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["section"] == "nvram"),
        "the element holds no VARS: {show:#}"
    );
    assert_eq!(
        verdicts(&w, &tpm_only.name),
        (true, true, true),
        "an element's VARS section on a domain without UEFI"
    );
}

// ================================================================ issue 20: <os><varstore>

/// A UEFI domain whose variables live in QEMU's uefi-vars device
/// (`<os><varstore>`, libvirt >= 12.1): OVMF as a ROM (Debian has no edk2
/// build that talks to the device, so the firmware keeps its variables in
/// RAM, but QEMU's device reads and rewrites the JSON file all the same),
/// the empty template from fixtures/.
fn varstore_xml(vm: &Vm) -> String {
    let template = root_dir().join("fixtures/varstore-template.json");
    let xml = domain_xml(&vm.name, &vm.uuid, Some(vm.tpm));
    let os = format!(
        "<os><type arch='x86_64' machine='q35'>hvm</type>\
<loader type='rom'>/usr/share/qemu/OVMF.fd</loader>\
<varstore template='{}'/></os><features><acpi/></features>",
        template.display()
    );
    let out = xml.replacen(
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>",
        &os,
        1,
    );
    assert_ne!(out, xml, "domain_xml changed its <os>");
    out
}

/// The variable `name` of a uefi-vars JSON file, as `(attr, data)`.
fn uefi_var(json: &[u8], name: &str) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(json).expect("varstore is JSON");
    v["variables"].as_array()?.iter().find_map(|x| {
        (x["name"] == name).then(|| {
            (
                x["attr"].as_u64().unwrap(),
                x["data"].as_str().unwrap().to_string(),
            )
        })
    })
}

/// A VM with `<varstore>` round-trips through its XML: a UEFI variable in
/// the JSON store and the TPM secret come back on a fresh host after
/// `undefine --nvram`. On a libvirt without `<varstore>` (before 12.1) the
/// test checks that libvirt drops the element, so nothing claims to carry it.
#[test]
fn varstore_travels_with_the_tpm() {
    require!(Env::Libvirt);
    let a = World::up("varstore-a");
    let vm = Vm::new("vs1", Tpm::V2);
    let xml = varstore_xml(&vm);
    let version = a.libvirt_version();
    if version < (12, 1, 0) {
        let path = a.define_xml(
            "vs1.xml",
            &xml.replace("/usr/share/qemu/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd"),
        );
        let out = a.exec(&["virsh", "dumpxml", &vm.name]);
        if out.status.success() {
            assert!(
                !stdout(&out).contains("<varstore"),
                "libvirt {version:?} kept a <varstore> from {}",
                path.display()
            );
        }
        eprintln!("varstore_travels_with_the_tpm: libvirt {version:?} has no <varstore> (12.1+); it drops the element");
        return;
    }
    a.install_hook();
    a.define_xml("vs1.xml", &xml);
    let file = format!("/var/lib/libvirt/qemu/varstore/{}.json", vm.name);
    let (_, defined) = a.dump(&vm.name, "vs1-defined.xml", true);
    assert!(
        defined.contains(&format!("path='{file}'")),
        "libvirt names another varstore path:\n{defined}"
    );
    // First run: libvirt copies the template, QEMU's device fills it in.
    a.start(&vm.name, false);
    a.destroy(&vm.name);
    let host_file = a.host_path(&file);
    let json = std::fs::read(&host_file).expect("libvirt made no varstore file");
    assert!(
        uefi_var(&json, "CustomMode").is_some(),
        "QEMU did not write the store: {}",
        String::from_utf8_lossy(&json)
    );
    // A variable set offline, as a guest sets one through the device.
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    v["variables"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "VtsVarstoreTest",
            "guid": "605dab50-e046-4300-abb6-3dd810dd8b23",
            "attr": 7,
            "data": "766972742d74706d2d7374617465"
        }));
    std::fs::write(&host_file, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let stored_json = std::fs::read(&host_file).unwrap();
    a.write_secret(&vm, "varstore-secret");
    let ek = a.ek_pub(&vm);
    a.must_store(&vm.name);
    let j = a.show_json(&vm.name, true);
    assert!(
        j["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "varstore.json"
                && f["section"] == "varstore"
                && f["size"] == stored_json.len()),
        "show lists no varstore.json: {j:#}"
    );
    assert_eq!(j["local"]["matches"], true, "{j:#}");
    let (_, xml) = a.dump(&vm.name, "vs1-stored.xml", true);
    assert!(
        xml.contains("varstore>"),
        "no <varstore> section in the element"
    );
    a.must_virsh(&["undefine", "--nvram", &vm.name]);
    assert!(
        !host_file.exists(),
        "undefine --nvram left the varstore file"
    );

    // A fresh host: the hook writes the stored JSON before QEMU opens it.
    let b = World::up("varstore-b");
    a.copy_keys_to(&b);
    b.install_hook();
    b.define_xml("vs1.xml", &xml);
    b.start(&vm.name, true);
    let b_file = b.host_path(&file);
    let m = std::fs::metadata(&b_file).expect("no varstore file on the new host");
    assert_eq!(m.mode() & 0o7777, 0o600);
    let json_b = std::fs::read(&b_file).unwrap();
    assert_eq!(
        uefi_var(&json_b, "VtsVarstoreTest"),
        Some((7, "766972742d74706d2d7374617465".to_string())),
        "the variable did not come back\n{}\n{}",
        String::from_utf8_lossy(&json_b),
        b.log_tail(30)
    );
    // The firmware ran on host B: the variable is still there.
    secret_kept_then_boot(&b, &vm, "varstore-secret", &ek, 3);
    assert!(uefi_var(&std::fs::read(&b_file).unwrap(), "VtsVarstoreTest").is_some());
}
