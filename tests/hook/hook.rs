//! The built `virt-tpm-state-hook` binary, run as libvirt runs it, against a
//! scratch tree (`VIRT_TPM_STATE_ROOT`), with the domain XML libvirt 9.0
//! really hands the hook (`fixtures/domains/`) and our element injected into
//! its `<metadata>`.
//!
//! Every run is checked for: exit code, EMPTY stdout, one line on stderr on
//! failure (none on success), and the exact effect on the scratch tree. A
//! failed assertion prints the args, exit code, stdout, stderr and a listing
//! of the tree (modes, owners, sizes, inodes, content digests).

use crate::common::env::Env;
use crate::common::runner::{Run, HOOK};
use crate::common::scratch::Scratch;
use crate::common::states::{fixture_uuid, stream};
use crate::common::tree::stat_diff;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use virt_tpm_state::format::{encode, Protection, Provenance, Style};
use virt_tpm_state::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::synthetic_blob;

const OTHER_UUID: &str = "9d6a0c21-7f3e-4b5a-a1c2-3d4e5f607182";

// ================================================================ fixtures

fn fixture(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// What libvirt 9.0 writes on the hook's stdin at `prepare begin` (a TPM 2.0
/// domain whose `<metadata>` holds a foreign element and a placeholder
/// `<vts:state format="1"/>`).
fn prepare_xml() -> String {
    fixture("domains/hook-stdin-prepare-begin.xml")
}

/// `base` with `element` as our metadata element: replaces an element of our
/// namespace already there, else adds it to `<metadata>` (creating that).
fn with_element(base: &str, element: &str) -> String {
    let indented: String = element.lines().map(|l| format!("    {l}\n")).collect();
    if let Some(pos) = base.find("urn:virt-tpm-state:1") {
        let line_start = base[..pos].rfind('\n').unwrap() + 1;
        let line_end = base[pos..].find('\n').unwrap() + pos + 1;
        assert!(
            base[line_start..line_end].trim_end().ends_with("/>"),
            "placeholder element is not one line"
        );
        return format!("{}{indented}{}", &base[..line_start], &base[line_end..]);
    }
    if let Some(pos) = base.find("  </metadata>") {
        return format!("{}{indented}{}", &base[..pos], &base[pos..]);
    }
    let pos = base.find("</uuid>\n").unwrap() + "</uuid>\n".len();
    format!(
        "{}  <metadata>\n{indented}  </metadata>\n{}",
        &base[..pos],
        &base[pos..]
    )
}

/// A real `name` captured from libvirt under `fixtures/` (outside the
/// vectors), if the e2e helper provided one.
fn real_permall(name: &str) -> Option<Vec<u8>> {
    fn find(dir: &Path, name: &str) -> Option<PathBuf> {
        let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type().ok()?;
            if ft.is_dir() && e.file_name() != "vectors" {
                if let Some(f) = find(&p, name) {
                    return Some(f);
                }
            } else if ft.is_file() && e.file_name() == name {
                return Some(p);
            }
        }
        None
    }
    let p = find(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        name,
    )?;
    let data = std::fs::read(p).ok()?;
    virt_tpm_state::swtpm::check_header(&data).ok()?;
    Some(data)
}

/// A valid swtpm state file, distinct per `seed`: a real permall captured
/// from libvirt (its last 32 bytes varied by the seed) when `fixtures/` has
/// one, else a synthetic blob of a fresh state's size.
fn blob(seed: &str) -> Vec<u8> {
    match real_permall("tpm2-00.permall") {
        Some(mut data) if data.len() > 64 => {
            let n = data.len();
            let tweak = Sha256Sum::of(seed.as_bytes()).0;
            for (b, t) in data[n - 32..].iter_mut().zip(tweak) {
                *b ^= t;
            }
            data
        }
        _ => synthetic_blob(0, &stream(seed, 6224)),
    }
}

fn blob12(seed: &str) -> Vec<u8> {
    synthetic_blob(0, &stream(seed, 3690))
}

fn tpm_state(version: TpmVersion, data: &[u8]) -> TpmState {
    TpmState::new(
        version,
        vec![StateFile {
            name: version.permall_name().into(),
            data: data.to_vec(),
        }],
    )
}

/// Our element for `uuid`, holding `data` as the TPM's permall.
fn element(uuid: &str, version: TpmVersion, data: &[u8], generation: u64) -> String {
    plain_element(&tpm_state(version, data).into(), uuid, generation)
}

/// `state` as a plaintext element for `uuid`, stored by "test-host".
fn plain_element(state: &MachineState, uuid: &str, generation: u64) -> String {
    let prov = Provenance {
        uuid: DomainUuid::parse(uuid).unwrap(),
        generation,
        parent: None,
        stored: "2026-01-01T00:00:00Z".into(),
        host: "test-host".into(),
    };
    encode(state, &prov, Style::Standalone, Protection::Plain).unwrap()
}

/// The prepare-begin XML carrying `data` as a TPM 2.0 state.
fn xml_with(data: &[u8]) -> String {
    let base = prepare_xml();
    let uuid = fixture_uuid(&base);
    with_element(&base, &element(&uuid, TpmVersion::V2_0, data, 1))
}

fn digest_short(data: &[u8]) -> String {
    tpm_state(TpmVersion::V2_0, data).digest().short()
}

fn current_user() -> (String, String, u32, u32) {
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    let user = nix::unistd::User::from_uid(uid).unwrap().unwrap().name;
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    (user, group, uid.as_raw(), gid.as_raw())
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn owner(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The live state dir holds exactly `data`, as libvirt expects it.
fn assert_live(s: &Scratch, data: &[u8], run: &Run) {
    let (_, _, uid, gid) = current_user();
    assert_eq!(names(&s.live_dir()), ["tpm2-00.permall"], "{run}");
    assert!(
        std::fs::read(s.live_permall()).unwrap() == data,
        "live permall has the wrong content{run}"
    );
    let uuid_dir = s.live_dir().parent().unwrap().to_path_buf();
    assert_eq!(names(&uuid_dir), ["tpm2"], "leftovers next to tpm2{run}");
    assert_eq!(mode(&uuid_dir), 0o711, "{run}");
    assert_eq!(mode(&s.live_dir()), 0o700, "{run}");
    assert_eq!(mode(&s.live_permall()), 0o600, "{run}");
    assert_eq!(owner(&s.live_dir()), (uid, gid), "{run}");
    assert_eq!(owner(&s.live_permall()), (uid, gid), "{run}");
}

fn backups(s: &Scratch) -> Vec<PathBuf> {
    let dir = s.path(&format!("var/lib/virt-tpm-state/backups/{}", s.uuid));
    if !dir.exists() {
        return Vec::new();
    }
    names(&dir).into_iter().map(|n| dir.join(n)).collect()
}

/// Runs `prepare` with `xml`, which must restore `data` as the live state.
fn prepare_restores(s: &Scratch, xml: &str, data: &[u8]) -> Run {
    let run = s.prepare(xml, &[]);
    run.ok();
    assert_live(s, data, &run);
    run
}

/// A scratch host where the hook restored M ("m1"), then the VM ran and left
/// the state seeded `local`: the host, M's XML and the local state.
fn restored_then_ran(local: &str) -> (Scratch, String, Vec<u8>) {
    let s = Scratch::new();
    let xml = xml_with(&blob("m1"));
    s.prepare(&xml, &[]).ok();
    let l = blob(local);
    std::fs::write(s.live_permall(), &l).unwrap();
    (s, xml, l)
}

fn backup_contents(s: &Scratch) -> Vec<Vec<u8>> {
    backups(s)
        .iter()
        .map(|b| std::fs::read(b.join("tpm2-00.permall")).unwrap())
        .collect()
}

// ================================================================ decision rule rows

#[test]
fn no_metadata_writes_nothing_at_all() {
    let s = Scratch::new();
    let before = s.stat_tree();
    for xml in [
        fixture("domains/tpm2-crb.xml"),
        fixture("domains/no-tpm.xml"),
    ] {
        let run = s.prepare(&xml, &[]);
        run.ok();
        assert_eq!(
            stat_diff(&before, &s.stat_tree()),
            Vec::<String>::new(),
            "{run}"
        );
    }
}

#[test]
fn restores_into_a_missing_state_dir() {
    let s = Scratch::new();
    let data = blob("m1");
    let before = s.stat_tree();
    let run = prepare_restores(&s, &xml_with(&data), &data);
    let u = &s.uuid;
    let added: Vec<String> = stat_diff(&before, &s.stat_tree());
    let expected: Vec<String> = [
        "run".to_string(),
        "run/virt-tpm-state".into(),
        // The disk-cap scan's hint (issue 22): written when the kept copy
        // below made gc measure the data dir.
        "run/virt-tpm-state/gc-usage".into(),
        "run/virt-tpm-state/locks".into(),
        format!("run/virt-tpm-state/locks/{u}.lock"),
        "var/lib/libvirt/swtpm".into(),
        format!("var/lib/libvirt/swtpm/{u}"),
        format!("var/lib/libvirt/swtpm/{u}/tpm2"),
        format!("var/lib/libvirt/swtpm/{u}/tpm2/tpm2-00.permall"),
        "var/lib/virt-tpm-state".into(),
        // The kept copy follows the sync journal (J), so that a deleted live
        // dir never looks "newer than the metadata" with an older copy.
        "var/lib/virt-tpm-state/kept".into(),
        format!("var/lib/virt-tpm-state/kept/{u}"),
        format!("var/lib/virt-tpm-state/kept/{u}/tpm2"),
        format!("var/lib/virt-tpm-state/kept/{u}/tpm2/tpm2-00.permall"),
        "var/lib/virt-tpm-state/synced".into(),
        format!("var/lib/virt-tpm-state/synced/{u}"),
        // The restore journal's dir (issue 17): its intent is gone once J
        // is written.
        "var/lib/virt-tpm-state/intents".into(),
    ]
    .iter()
    .map(|p| format!("+ {p}"))
    .collect();
    let mut added_sorted = added.clone();
    added_sorted.sort();
    let mut expected_sorted = expected.clone();
    // The harness's host already has var/lib/libvirt (libvirt's qemu/nvram):
    // those two gain an entry (their mtime and link count change).
    expected_sorted.extend(["~ var/lib".to_string(), "~ var/lib/libvirt".to_string()]);
    expected_sorted.sort();
    assert_eq!(added_sorted, expected_sorted, "{run}");
    // Our own private dirs are 0700, the journal names the restored digest.
    for d in [
        "var/lib/virt-tpm-state",
        "var/lib/virt-tpm-state/synced",
        "run/virt-tpm-state",
    ] {
        assert_eq!(mode(&s.path(d)), 0o700, "{d}{run}");
    }
    let journal =
        std::fs::read_to_string(s.path(&format!("var/lib/virt-tpm-state/synced/{u}"))).unwrap();
    assert_eq!(
        journal.trim(),
        tpm_state(TpmVersion::V2_0, &data).digest().hex(),
        "{run}"
    );
    assert_eq!(
        mode(&s.path(&format!("var/lib/virt-tpm-state/synced/{u}"))),
        0o600
    );
}

#[test]
fn tpm12_restores_into_tpm1_2_dir() {
    let s = Scratch::new();
    let base = fixture("domains/tpm12-tis.xml");
    let uuid = fixture_uuid(&base);
    let data = blob12("v12");
    let xml = with_element(&base, &element(&uuid, TpmVersion::V1_2, &data, 1));
    let run = s.prepare(&xml, &[]);
    run.ok();
    let dir = s.path(&format!("var/lib/libvirt/swtpm/{uuid}/tpm1.2"));
    assert_eq!(names(&dir), ["tpm-00.permall"], "{run}");
    assert!(
        std::fs::read(dir.join("tpm-00.permall")).unwrap() == data,
        "{run}"
    );
}

#[test]
fn metadata_equal_to_local_changes_nothing() {
    let s = Scratch::new();
    let data = blob("m1");
    let xml = xml_with(&data);
    s.prepare(&xml, &[]).ok();
    let before = s.stat_tree();
    let permall = format!("var/lib/libvirt/swtpm/{}/tpm2/tpm2-00.permall", s.uuid);
    std::thread::sleep(Duration::from_millis(20));
    let run = s.prepare(&xml, &[]);
    run.ok();
    let after = s.stat_tree();
    assert_eq!(
        before[&permall], after[&permall],
        "permall touched (inode/mtime){run}"
    );
    // Only the sync journal may be rewritten.
    let journal = format!("~ var/lib/virt-tpm-state/synced/{}", s.uuid);
    for d in stat_diff(&before, &after) {
        assert!(
            d == journal || d == "~ var/lib/virt-tpm-state/synced",
            "unexpected change {d}{run}"
        );
    }
    assert!(backups(&s).is_empty(), "{run}");
}

#[test]
fn newer_metadata_wins_and_local_is_backed_up() {
    // L == J, M moved on (stored elsewhere): M wins, L kept as a backup.
    let s = Scratch::new();
    let m1 = blob("m1");
    s.prepare(&xml_with(&m1), &[]).ok();
    let m2 = blob("m2");
    let run = prepare_restores(&s, &xml_with(&m2), &m2);
    let b = backups(&s);
    assert_eq!(b.len(), 1, "{run}");
    let name = b[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.ends_with(&format!("-{}-tpm2", digest_short(&m1))),
        "{name}{run}"
    );
    assert_eq!(backup_contents(&s), vec![m1], "{run}");
    assert_eq!(mode(&b[0]), 0o700);
    assert_eq!(mode(&b[0].join("tpm2-00.permall")), 0o600);
    let me = (current_user().2, current_user().3);
    assert_eq!(owner(&b[0].join("tpm2-00.permall")), me);
    assert_eq!(mode(b[0].parent().unwrap()), 0o700);
}

#[test]
fn conflict_metadata_wins_and_local_is_backed_up() {
    // L != J and M != J: both moved; default policy: M wins, L backed up.
    let (s, _, l) = restored_then_ran("l-local-run");
    let m2 = blob("m2");
    let run = prepare_restores(&s, &xml_with(&m2), &m2);
    assert_eq!(backup_contents(&s), vec![l], "{run}");
}

#[test]
fn kept_copy_is_put_back_when_the_live_dir_was_deleted() {
    // The VM ran: its state changed; then it stopped and libvirt deleted the dir.
    let (s, xml, l) = restored_then_ran("l-final-state");
    s.hook("stopped", "end", &xml, &[]).ok();
    std::fs::remove_dir_all(s.live_dir().parent().unwrap()).unwrap();
    let run = prepare_restores(&s, &xml, &l);
    assert!(backups(&s).is_empty(), "{run}");
}

#[test]
fn backups_are_pruned_to_backups_per_domain() {
    let s = Scratch::new();
    s.config("backups_per_domain = 2\n");
    s.prepare(&xml_with(&blob("m0")), &[]).ok();
    let mut replaced = Vec::new();
    for i in 1..=4 {
        let l = blob(&format!("local-{i}"));
        std::fs::write(s.live_permall(), &l).unwrap();
        replaced.push(l);
        s.prepare(&xml_with(&blob(&format!("m{i}"))), &[]).ok();
    }
    let run = s.prepare(&xml_with(&blob("m4")), &[]);
    run.ok();
    assert_eq!(backups(&s).len(), 2, "{run}");
    // The two newest replaced states survive.
    assert_eq!(backup_contents(&s), replaced[2..].to_vec(), "{run}");
}

// ================================================================ incoming

fn incoming_then_prepare(op: &str, base: &str) {
    let s = Scratch::new();
    let data = blob("m1");
    let xml = with_element(base, &element(&s.uuid, TpmVersion::V2_0, &data, 1));
    let run = s.hook(op, "begin", &xml, &[]);
    run.ok();
    let marker = s.path(&format!("run/virt-tpm-state/incoming/{}", s.uuid));
    assert!(marker.is_file(), "no marker after {op} begin{run}");
    assert_eq!(mode(&marker), 0o600);
    let run = s.prepare(&xml, &[]);
    run.ok();
    assert!(
        !s.live_dir().exists(),
        "{op} begin, then prepare must not restore{run}"
    );
    let run = s.hook(
        "release",
        "end",
        fixture("domains/hook-stdin-release-end.xml"),
        &[],
    );
    run.ok();
    assert!(!marker.exists(), "release end must clear the marker{run}");
    prepare_restores(&s, &xml, &data);
}

#[test]
fn migrate_begin_then_prepare_does_not_restore() {
    incoming_then_prepare("migrate", &prepare_xml());
}

#[test]
fn restore_begin_then_prepare_does_not_restore() {
    incoming_then_prepare("restore", &fixture("domains/hook-stdin-restore-begin.xml"));
}

// ================================================================ refusals

#[test]
fn invalid_metadata_exits_4() {
    let s = Scratch::new();
    // The real prepare stdin: `<vts:state format="1"/>`, no uuid, no files.
    let run = s.refused("prepare", &prepare_xml(), 4);
    run.says(&["invalid", "virsh metadata", "--remove"]);
    let run = s.refused(
        "prepare",
        &xml_with(&blob("m1")).replace("encoding=\"gzip+base64\"", "encoding=\"zstd\""),
        4,
    );
    run.says(&["zstd"]);
}

#[test]
fn clone_exits_5_and_says_how_to_remove_or_adopt() {
    let s = Scratch::new();
    let xml = with_element(
        &prepare_xml(),
        &element(OTHER_UUID, TpmVersion::V2_0, &blob("m1"), 1),
    );
    let run = s.refused("prepare", &xml, 5);
    run.says(&[OTHER_UUID, &s.uuid, "virsh metadata", "--remove", "adopt"]);
}

#[test]
fn tpm_version_mismatch_exits_4() {
    let s = Scratch::new();
    let xml = with_element(
        &prepare_xml(),
        &element(&s.uuid, TpmVersion::V1_2, &blob12("x"), 1),
    );
    s.refused("prepare", &xml, 4).says(&["1.2", "2.0"]);
}

#[test]
fn symlink_at_uuid_dir_exits_7() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("var/lib/libvirt/swtpm")).unwrap();
    std::os::unix::fs::symlink(
        s.path("elsewhere"),
        s.path(&format!("var/lib/libvirt/swtpm/{}", s.uuid)),
    )
    .unwrap();
    s.refused("prepare", &xml_with(&blob("m1")), 7)
        .says(&["symlink"]);
    assert_eq!(names(&s.path("elsewhere")), ["host-file"]);
}

#[test]
fn hard_linked_live_permall_exits_7() {
    let s = Scratch::new();
    s.prepare(&xml_with(&blob("m1")), &[]).ok();
    std::fs::hard_link(s.live_permall(), s.path("elsewhere/linked")).unwrap();
    s.refused("prepare", &xml_with(&blob("m2")), 7)
        .says(&["hard link"]);
}

#[test]
fn symlinked_live_permall_exits_7() {
    let s = Scratch::new();
    s.prepare(&xml_with(&blob("m1")), &[]).ok();
    std::fs::remove_file(s.live_permall()).unwrap();
    std::os::unix::fs::symlink(s.path("elsewhere/host-file"), s.live_permall()).unwrap();
    s.refused("prepare", &xml_with(&blob("m2")), 7)
        .says(&["symlink"]);
}

#[test]
fn source_path_with_dotdot_exits_7() {
    let s = Scratch::new();
    let xml = xml_with(&blob("m1")).replace(
        "<backend type='emulator' version='2.0'/>",
        "<backend type='emulator' version='2.0'>\n        <source type='dir' path='/srv/../etc'/>\n      </backend>",
    );
    assert!(xml.contains("/srv/../etc"));
    s.refused("prepare", &xml, 7).says(&["/srv/../etc"]);
}

#[test]
fn decompression_bomb_exits_4() {
    let s = Scratch::new();
    let v = fixture("vectors/refused-decompression-bomb.xml");
    let start = v.find("<vts:state").unwrap();
    let end = v.find("</vts:state>").unwrap() + "</vts:state>".len();
    let vector_uuid = fixture_uuid(&v);
    let el = v[start..end]
        .replace(
            &format!("uuid=\"{vector_uuid}\""),
            &format!("uuid=\"{}\"", s.uuid),
        )
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    let run = s.refused("prepare", &with_element(&prepare_xml(), &el), 4);
    run.says(&["decompress"]);
    assert!(run.elapsed < Duration::from_secs(10), "{run}");
}

#[test]
fn malformed_domain_uuid_exits_3_and_creates_nothing_anywhere() {
    let s = Scratch::new();
    let xml = xml_with(&blob("m1")).replacen(
        &format!("<uuid>{}</uuid>", s.uuid),
        "<uuid>../../x</uuid>",
        1,
    );
    for op in ["prepare", "migrate", "restore"] {
        s.refused(op, &xml, 3).says(&["uuid"]);
    }
    let run = s.hook("stopped", "end", &xml, &[]);
    run.failed(3);
    for p in ["/x", "/var/lib/x", "/var/lib/libvirt/x"] {
        assert!(!Path::new(p).exists(), "{p} exists");
    }
    assert_eq!(s.outside(), ["root"]);
}

// ================================================================ state dir traps

#[test]
fn existing_empty_state_dir_is_filled_atomically() {
    // libvirt 9.0 skips swtpm_setup for an existing empty dir: it must not
    // stay empty, and must be swapped, not filled in place.
    let s = Scratch::new();
    let uuid_dir = s.live_dir().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(s.live_dir()).unwrap();
    std::fs::set_permissions(&uuid_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(s.live_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let old_ino = std::fs::metadata(s.live_dir()).unwrap().ino();
    let data = blob("m1");
    let run = prepare_restores(&s, &xml_with(&data), &data);
    let new_ino = std::fs::metadata(s.live_dir()).unwrap().ino();
    assert_ne!(
        old_ino, new_ino,
        "the dir was filled in place, not swapped{run}"
    );
}

#[test]
fn leftover_temp_dir_of_a_killed_run_is_cleaned() {
    let s = Scratch::new();
    let uuid_dir = s.live_dir().parent().unwrap().to_path_buf();
    let leftover = uuid_dir.join(".tpm2.vts-new.4242.000000001");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::set_permissions(&uuid_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::write(leftover.join("tpm2-00.permall"), b"half-written").unwrap();
    let old = uuid_dir.join(".tpm2.vts-old.4242.000000002");
    std::fs::create_dir_all(&old).unwrap();
    let data = blob("m1");
    prepare_restores(&s, &xml_with(&data), &data);
}

// ================================================================ stop

#[test]
fn stopped_end_keeps_a_private_copy() {
    let (s, xml, l) = restored_then_ran("final");
    let run = s.hook("stopped", "end", &xml, &[]);
    run.ok();
    let kept = s.path(&format!("var/lib/virt-tpm-state/kept/{}", s.uuid));
    let (_, _, uid, gid) = current_user();
    for (p, m) in [
        (s.path("var/lib/virt-tpm-state/kept"), 0o700),
        (kept.clone(), 0o700),
        (kept.join("tpm2"), 0o700),
        (kept.join("tpm2/tpm2-00.permall"), 0o600),
    ] {
        assert_eq!(mode(&p), m, "{}{run}", p.display());
        assert_eq!(owner(&p), (uid, gid), "{}{run}", p.display());
    }
    assert_eq!(names(&kept), ["tpm2"], "{run}");
    assert_eq!(names(&kept.join("tpm2")), ["tpm2-00.permall"], "{run}");
    assert!(
        std::fs::read(kept.join("tpm2/tpm2-00.permall")).unwrap() == l,
        "{run}"
    );
    // The live state is left alone.
    assert!(std::fs::read(s.live_permall()).unwrap() == l, "{run}");
    // Stopping again with the same state rewrites nothing.
    let before = s.stat_tree();
    s.hook("stopped", "end", &xml, &[]).ok();
    assert_eq!(stat_diff(&before, &s.stat_tree()), Vec::<String>::new());
}

#[test]
fn stopped_end_starts_the_helper_detached_with_a_clean_environment() {
    let s = Scratch::new();
    let helper = s.tmp.path().join("bin/fake-virt-tpm-state");
    std::fs::create_dir_all(helper.parent().unwrap()).unwrap();
    std::fs::write(
        &helper,
        "#!/bin/sh\nenv > \"$VIRT_TPM_STATE_ROOT/../bin/helper-env\"\nprintf '%s\\n' \"$@\" > \"$VIRT_TPM_STATE_ROOT/../bin/argv.tmp\"\nmv \"$VIRT_TPM_STATE_ROOT/../bin/argv.tmp\" \"$VIRT_TPM_STATE_ROOT/../bin/helper-argv\"\nexec sleep 10\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.config(&format!(
        "store_after_stop = true\nhelper_path = \"{}\"\n",
        helper.display()
    ));
    let xml = xml_with(&blob("m1"));
    s.prepare(&xml, &[]).ok();
    let run = s.hook("stopped", "end", &xml, &[]);
    run.ok();
    assert!(
        run.elapsed < Duration::from_secs(5),
        "the hook waited for the helper{run}"
    );
    let argv_file = s.tmp.path().join("bin/helper-argv");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !argv_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let argv = std::fs::read_to_string(&argv_file).expect("the helper was started");
    assert_eq!(argv, format!("store\n--after-stop\n{}\n", s.uuid), "{run}");
    let env = std::fs::read_to_string(s.tmp.path().join("bin/helper-env")).unwrap();
    assert!(
        !env.contains("VTS_TEST_CANARY"),
        "the hook's environment leaked:\n{env}"
    );
    for line in env.lines() {
        let key = line.split('=').next().unwrap();
        assert!(
            [
                "PATH",
                "LC_ALL",
                "VIRT_TPM_STATE_ROOT",
                "LIBVIRT_DEFAULT_URI",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(&key),
            "unexpected variable {key} in the helper's environment:\n{env}"
        );
    }
    assert!(env.contains("LC_ALL=C"), "{env}");
}

// ================================================================ ignored ops

#[test]
fn ignored_ops_exit_at_once_without_reading_stdin() {
    let s = Scratch::new();
    let before = s.stat_tree();
    for (op, subop) in [
        ("start", "begin"),
        ("started", "begin"),
        ("prepare", "end"),
        ("stopped", "begin"),
        ("migrate", "end"),
        ("reconnect", "begin"),
        ("attach", "begin"),
    ] {
        let mut cmd = s.hook_command(op, subop);
        let args = [op, subop];
        let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
        // Keep the writer open: the hook must not wait for EOF.
        let _stdin = child.stdin.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{args:?} waited for stdin");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}");
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{args:?}: {out:?}"
        );
    }
    assert_eq!(stat_diff(&before, &s.stat_tree()), Vec::<String>::new());
}

#[test]
fn release_and_stop_without_state_write_nothing() {
    let s = Scratch::new();
    let before = s.stat_tree();
    s.hook(
        "release",
        "end",
        fixture("domains/hook-stdin-release-end.xml"),
        &[],
    )
    .ok();
    s.hook("stopped", "end", fixture("domains/no-tpm.xml"), &[])
        .ok();
    s.hook("migrate", "begin", fixture("domains/no-tpm.xml"), &[])
        .ok();
    assert_eq!(stat_diff(&before, &s.stat_tree()), Vec::<String>::new());
}

// ================================================================ secrets

#[test]
fn refusals_never_show_the_state() {
    let s = Scratch::new();
    s.config("on_conflict = \"refuse\"\n");
    let data = blob("secret-state");
    let xml = xml_with(&data);
    let b64_start = xml.find("gzip+base64\">").unwrap() + "gzip+base64\">".len();
    let b64_end = xml[b64_start..].find('<').unwrap() + b64_start;
    let b64 = xml[b64_start..b64_end].to_string();
    let digest = tpm_state(TpmVersion::V2_0, &data).digest().hex();
    let sha = Sha256Sum::of(&data).hex();
    let mut runs = Vec::new();
    // Invalid: a corrupted digest, a wrong size, a bad base64 character.
    runs.push(s.refused(
        "prepare",
        &xml.replace(&digest, &Sha256Sum::of(b"x").hex()),
        4,
    ));
    runs.push(s.refused("prepare", &xml.replace(&sha, &Sha256Sum::of(b"x").hex()), 4));
    let mut bad = b64.clone();
    bad.insert(100, '*');
    runs.push(s.refused("prepare", &xml.replace(&b64, &bad), 4));
    // A clone and a conflict.
    runs.push(s.refused(
        "prepare",
        &with_element(
            &prepare_xml(),
            &element(OTHER_UUID, TpmVersion::V2_0, &data, 1),
        ),
        5,
    ));
    s.prepare(&xml_with(&blob("m0")), &[]).ok();
    std::fs::write(s.live_permall(), blob("local")).unwrap();
    runs.push(s.refused("prepare", &xml, 6));
    for run in &runs {
        let err_text = run.err();
        let err = err_text.as_bytes();
        for chunk in b64.as_bytes().chunks(16).filter(|c| c.len() == 16) {
            assert!(
                !err.windows(16).any(|w| w == chunk),
                "stderr shows base64 of the state{run}"
            );
        }
        for w in data[10..].windows(8).step_by(8) {
            assert!(
                !err.windows(8).any(|e| e == w),
                "stderr shows raw state bytes{run}"
            );
        }
        // Digests are shown as 12-digit prefixes at most.
        assert!(
            !run.err().contains(&digest) && !run.err().contains(&sha),
            "{run}"
        );
    }
}

// ================================================================ the binary

/// The hook links no libvirt: no libvirt library needed, no libvirt symbol
/// imported, and (the crate boundary, hooks/) the library it was compiled
/// against had no libvirt module: cargo's dep-info beside the binary lists
/// every source file that went into it.
#[test]
fn hook_does_not_link_libvirt() {
    require!(Env::Cmd("readelf"));
    let out = Command::new("readelf")
        .args(["--dynamic", "--dyn-syms", "--wide", HOOK])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("libc.so"), "no dynamic section read:\n{text}");
    assert!(!text.contains("libvirt"), "the hook links libvirt:\n{text}");
    // libvirt's C API: every function is virSomething (virConnectOpen, ...).
    let imported: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" UND "))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|sym| sym.starts_with("vir"))
        .collect();
    assert!(imported.is_empty(), "the hook imports {imported:?}");

    let dep_info = format!("{HOOK}.d");
    let sources = std::fs::read_to_string(&dep_info)
        .unwrap_or_else(|e| panic!("{dep_info} (cargo's list of the hook's sources): {e}"));
    assert!(
        sources.contains("hooks/src/main.rs") && sources.contains("src/hook.rs"),
        "{dep_info} is not the hook's: {sources}"
    );
    assert!(
        !sources.contains("src/libvirt.rs"),
        "{HOOK} was built against the library with its libvirt feature (cargo \
         unifies features when the hook is built in one invocation with the CLI); \
         build it alone: cargo build -p virt-tpm-state-hook --features fault-injection"
    );
}

#[test]
fn usage_error_exits_2() {
    let s = Scratch::new();
    let out = Command::new(HOOK)
        .env("VIRT_TPM_STATE_ROOT", s.root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn as_root_without_qemu_conf_restored_files_belong_to_tss() {
    require!(Env::Root);
    let s = Scratch::new();
    std::fs::remove_file(s.path("etc/libvirt/qemu.conf")).unwrap();
    let (uid, gid) = match (
        nix::unistd::User::from_name("tss").ok().flatten(),
        nix::unistd::Group::from_name("tss").ok().flatten(),
    ) {
        (Some(u), Some(g)) => (u.uid.as_raw(), g.gid.as_raw()),
        _ => {
            eprintln!("no tss user/group on this host: expecting root, as libvirt does");
            (0, 0)
        }
    };
    let data = blob("m1");
    let run = s.prepare(&xml_with(&data), &[]);
    run.ok();
    assert_eq!(owner(&s.live_dir()), (uid, gid), "{run}");
    assert_eq!(owner(&s.live_permall()), (uid, gid), "{run}");
    assert_eq!(owner(s.live_dir().parent().unwrap()), (0, 0), "{run}");
    assert_eq!(mode(&s.live_permall()), 0o600, "{run}");
}

// ================================================================ UEFI NVRAM

/// A VARS store like OVMF's 4M build: some variable data, erased flash.
fn vars(seed: &str) -> Vec<u8> {
    let mut v = stream(seed, 4096);
    v.resize(540672, 0xff);
    v
}

/// Our element holding a TPM 2.0 state (`tpm`) and/or a VARS file.
fn machine_element(uuid: &str, tpm: Option<&[u8]>, nvram: Option<&[u8]>) -> String {
    let state = MachineState::new(
        tpm.map(|d| tpm_state(TpmVersion::V2_0, d)),
        nvram.map(<[u8]>::to_vec),
    );
    plain_element(&state, uuid, 1)
}

/// The prepare XML of a UEFI domain (firmware autoselection: no `<nvram>`
/// path yet, as libvirt hands it to `prepare`), `os` replacing `<os>`.
fn uefi_xml(os: &str, tpm: Option<&[u8]>, nvram: Option<&[u8]>) -> String {
    let base = prepare_xml().replacen("<os>", os, 1);
    assert!(base.contains(os));
    let uuid = fixture_uuid(&base);
    with_element(&base, &machine_element(&uuid, tpm, nvram))
}

const EFI: &str = "<os firmware='efi'>";
const VARS_REL: &str = "var/lib/libvirt/qemu/nvram/tpm2-with-metadata_VARS.fd";

/// A scratch host whose qemu.conf names the current user as `user`/`group`
/// too (the owner of VARS files), with libvirt's nvram dir.
fn uefi_scratch() -> Scratch {
    let s = Scratch::new();
    let (user, group, _, _) = current_user();
    s.write(
        "etc/libvirt/qemu.conf",
        &format!("swtpm_user = \"{user}\"\nswtpm_group = \"{group}\"\nuser = \"{user}\"\ngroup = \"{group}\"\n"),
    );
    std::fs::create_dir_all(s.path("var/lib/libvirt/qemu/nvram")).unwrap();
    s
}

#[test]
fn nvram_is_restored_with_the_tpm_in_one_decision() {
    let s = uefi_scratch();
    let (_, _, uid, gid) = current_user();
    let (data, v) = (blob("n1"), vars("v1"));
    let xml = uefi_xml(EFI, Some(&data), Some(&v));
    let run = s.prepare(&xml, &[]);
    run.ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), v, "{run}");
    assert_eq!(std::fs::read(s.live_permall()).unwrap(), data, "{run}");
    assert_eq!(mode(&s.path(VARS_REL)), 0o600, "{run}");
    assert_eq!(owner(&s.path(VARS_REL)), (uid, gid), "{run}");
    // Nothing left behind in libvirt's shared nvram dir.
    let names: Vec<String> = std::fs::read_dir(s.path("var/lib/libvirt/qemu/nvram"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["tpm2-with-metadata_VARS.fd".to_string()]);
    // Same state again: nothing rewritten.
    let ino = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
    let before = (ino(&s.path(VARS_REL)), ino(&s.live_permall()));
    s.prepare(&xml, &[]).ok();
    assert_eq!(before, (ino(&s.path(VARS_REL)), ino(&s.live_permall())));

    // The guest changed its variables locally (L newer, J == M): kept.
    std::fs::write(s.path(VARS_REL), vars("guest")).unwrap();
    s.prepare(&xml, &[]).ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), vars("guest"));

    // A stop keeps a copy of both; with both live files gone (undefine
    // --nvram on this host), the next prepare puts that copy back.
    s.hook("stopped", "end", &xml, &[]).ok();
    std::fs::remove_dir_all(s.live_dir()).unwrap();
    std::fs::remove_file(s.path(VARS_REL)).unwrap();
    let run = s.prepare(&xml, &[]);
    run.ok();
    assert_eq!(
        std::fs::read(s.path(VARS_REL)).unwrap(),
        vars("guest"),
        "{run}"
    );
    assert_eq!(std::fs::read(s.live_permall()).unwrap(), data, "{run}");

    // A new metadata state wins over the synced local one: both replaced
    // (never a TPM from one generation and VARS from another), the local
    // pair backed up together.
    let (data2, v2) = (blob("n2"), vars("v2"));
    s.prepare(&xml, &[]).ok();
    let run = s.prepare(&uefi_xml(EFI, Some(&data2), Some(&v2)), &[]);
    run.ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), v2, "{run}");
    assert_eq!(std::fs::read(s.live_permall()).unwrap(), data2, "{run}");
    let backups = s.path(&format!("var/lib/virt-tpm-state/backups/{}", s.uuid));
    let newest = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    assert_eq!(
        std::fs::read(newest.join("VARS.fd")).unwrap(),
        vars("guest")
    );
}

#[test]
fn nvram_explicit_paths_are_honoured() {
    let s = uefi_scratch();
    std::fs::create_dir_all(s.path("srv/nv")).unwrap();
    // Outside libvirt's own dirs only where the admin allows it.
    s.config("state_path_prefixes = [\"/srv/nv\"]");
    let v = vars("explicit");
    for os in [
        "<os><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/nv/a_VARS.fd</nvram>",
        "<os firmware='efi'><nvram type='file'><source file='/srv/nv/a_VARS.fd'/></nvram>",
    ] {
        let _ = std::fs::remove_file(s.path("srv/nv/a_VARS.fd"));
        let _ = std::fs::remove_dir_all(s.path("var/lib/virt-tpm-state"));
        let _ = std::fs::remove_dir_all(s.path("var/lib/libvirt/swtpm"));
        let run = s.prepare(&uefi_xml(os, Some(&blob("x")), Some(&v)), &[]);
        run.ok();
        assert_eq!(std::fs::read(s.path("srv/nv/a_VARS.fd")).unwrap(), v, "{run}");
        assert!(!s.path(VARS_REL).exists());
    }
}

#[test]
fn nvram_links_and_bad_paths_are_refused_before_anything_is_written() {
    let v = vars("hostile");
    let data = blob("h");
    // A symlink where the VARS file goes (planted by the qemu user).
    let s = uefi_scratch();
    std::os::unix::fs::symlink(s.path("elsewhere/host-file"), s.path(VARS_REL)).unwrap();
    let run = s.refused("prepare", &uefi_xml(EFI, Some(&data), Some(&v)), 7);
    assert!(run.err().contains("symlink"), "{run}");
    // A hard link to a host file.
    let s = uefi_scratch();
    std::fs::hard_link(s.path("elsewhere/host-file"), s.path(VARS_REL)).unwrap();
    s.refused("prepare", &uefi_xml(EFI, Some(&data), Some(&v)), 7);
    // A directory of an explicit (allowed) path that is a symlink.
    let s = uefi_scratch();
    s.config("state_path_prefixes = [\"/srv\"]");
    std::os::unix::fs::symlink(s.path("elsewhere"), s.path("srv")).unwrap();
    s.refused(
        "prepare",
        &uefi_xml(
            "<os firmware='efi'><nvram>/srv/x_VARS.fd</nvram>",
            Some(&data),
            Some(&v),
        ),
        7,
    );
    // Explicit paths with '..', relative, or NUL-free but odd.
    for bad in ["/var/lib/../../elsewhere/x", "relative/x.fd", "/var//x.fd"] {
        let s = uefi_scratch();
        s.refused(
            "prepare",
            &uefi_xml(
                &format!("<os firmware='efi'><nvram>{bad}</nvram>"),
                Some(&data),
                Some(&v),
            ),
            7,
        );
    }
    // A name that cannot be a file name never becomes a path.
    let s = uefi_scratch();
    let xml = uefi_xml(EFI, Some(&data), Some(&v)).replacen(
        "<name>tpm2-with-metadata</name>",
        "<name>../../../elsewhere/host-file</name>",
        1,
    );
    s.refused("prepare", &xml, 7);
    assert_eq!(
        std::fs::read_to_string(s.path("elsewhere/host-file")).unwrap(),
        "a host file the hook must never touch\n"
    );
}

#[test]
fn nvram_sections_apply_only_where_carried() {
    let v = vars("only");
    // An element with the TPM only leaves an existing VARS file alone.
    let s = uefi_scratch();
    std::fs::write(s.path(VARS_REL), b"local vars").unwrap();
    s.prepare(&uefi_xml(EFI, Some(&blob("t")), None), &[]).ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), b"local vars");
    // nvram = false: the section is ignored, the TPM restored.
    let s = uefi_scratch();
    s.config("nvram = false\n");
    let run = s.prepare(&uefi_xml(EFI, Some(&blob("t")), Some(&v)), &[]);
    assert_eq!(run.status.code(), Some(0), "{run}");
    assert!(!s.path(VARS_REL).exists());
    assert!(s.live_permall().exists());
    // A BIOS domain: the section is ignored.
    let s = uefi_scratch();
    let run = s.prepare(&uefi_xml("<os>", Some(&blob("t")), Some(&v)), &[]);
    assert_eq!(run.status.code(), Some(0), "{run}");
    assert!(s.live_permall().exists());
    assert_eq!(
        std::fs::read_dir(s.path("var/lib/libvirt/qemu/nvram"))
            .unwrap()
            .count(),
        0
    );
    // A domain without a TPM: only with nvram_without_tpm.
    let no_tpm = |xml: String| {
        let start = xml.find("<tpm ").unwrap();
        let end = xml.find("</tpm>").unwrap() + "</tpm>".len();
        format!("{}{}", &xml[..start], &xml[end..])
    };
    let s = uefi_scratch();
    let xml = no_tpm(uefi_xml(EFI, None, Some(&v)));
    let before = s.stat_tree();
    let run = s.prepare(&xml, &[]);
    assert_eq!(run.status.code(), Some(0), "{run}");
    assert!(stat_diff(&before, &s.stat_tree()).is_empty(), "{run}");
    s.config("nvram_without_tpm = true\n");
    let run = s.prepare(&xml, &[]);
    run.ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), v, "{run}");
    assert!(!s.path("var/lib/libvirt/swtpm").exists(), "{run}");
}

#[test]
fn nvram_stray_vars_file_is_backed_up_before_it_is_replaced() {
    // `undefine --keep-nvram` and a define elsewhere's XML: the VARS file is
    // there, the TPM state is not; the metadata wins, the old VARS is kept.
    let s = uefi_scratch();
    std::fs::write(s.path(VARS_REL), b"an older variable store").unwrap();
    let v = vars("new");
    let run = s.prepare(&uefi_xml(EFI, Some(&blob("s")), Some(&v)), &[]);
    run.ok();
    assert_eq!(std::fs::read(s.path(VARS_REL)).unwrap(), v, "{run}");
    let backups = s.path(&format!("var/lib/virt-tpm-state/backups/{}", s.uuid));
    let dirs: Vec<PathBuf> = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{run}");
    assert_eq!(
        std::fs::read(dirs[0].join("VARS.fd")).unwrap(),
        b"an older variable store"
    );
}

/// The XML is hostile: an explicit `<nvram>` or `<source type='dir'>` path
/// outside libvirt's dirs (and the admin's `state_path_prefixes`) is refused
/// before anything is read or written, so `<nvram>/etc/shadow` cannot
/// overwrite (or leak) a host file and `<source path='/etc/x'>` cannot swap
/// out a host directory.
#[test]
fn paths_outside_allowed_dirs_are_refused() {
    let v = vars("hostile");
    let data = blob("h");
    for target in ["/elsewhere/host-file", "/var/lib/libvirt/qemu/other.fd"] {
        let s = uefi_scratch();
        let run = s.refused(
            "prepare",
            &uefi_xml(
                &format!("<os firmware='efi'><nvram>{target}</nvram>"),
                Some(&data),
                Some(&v),
            ),
            7,
        );
        assert!(run.err().contains("state_path_prefixes"), "{run}");
        assert_eq!(
            std::fs::read_to_string(s.path("elsewhere/host-file")).unwrap(),
            "a host file the hook must never touch\n"
        );
    }
    // A VARS file in libvirt's own nvram dir needs no configuration.
    let s = uefi_scratch();
    s.prepare(
        &uefi_xml(
            "<os firmware='efi'><nvram>/var/lib/libvirt/qemu/nvram/explicit_VARS.fd</nvram>",
            Some(&data),
            Some(&v),
        ),
        &[],
    )
    .ok();
    // A TPM <source type='dir'> outside any allowed prefix.
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("etc/victimdir/sub")).unwrap();
    std::fs::write(s.path("etc/victimdir/sub/b"), "keep me").unwrap();
    let xml = xml_with(&blob("x")).replace(
        "<backend type='emulator' version='2.0'/>",
        "<backend type='emulator' version='2.0'>\n        <source type='dir' path='/etc/victimdir'/>\n      </backend>",
    );
    assert!(xml.contains("/etc/victimdir"));
    let run = s.refused("prepare", &xml, 7);
    assert!(run.err().contains("state_path_prefixes"), "{run}");
    assert_eq!(
        std::fs::read_to_string(s.path("etc/victimdir/sub/b")).unwrap(),
        "keep me"
    );
}

// ================================================================ <source type='file'>

/// `xml_with(data)` with the TPM state at `<source type='file' path=PATH>`.
fn file_source_xml(data: &[u8], path: &str) -> String {
    let xml = xml_with(data).replace(
        "<backend type='emulator' version='2.0'/>",
        &format!("<backend type='emulator' version='2.0'>\n        <source type='file' path='{path}'/>\n      </backend>"),
    );
    assert!(xml.contains(path), "fixture has no plain emulator backend");
    xml
}

fn file_scratch() -> Scratch {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("srv/tpm")).unwrap();
    s.config("state_path_prefixes = [\"/srv/tpm\"]");
    s
}

/// The hook restores a `<source type='file'>` state as swtpm's linear file
/// holding the permall alone, owned by swtpm_user, 0600; a local file that
/// differs is replaced and kept as a backup; the same state again writes
/// nothing.
#[test]
fn source_file_is_restored_as_a_linear_file() {
    use virt_tpm_state::linear;
    let s = file_scratch();
    let file = s.path("srv/tpm/vm.tpm");
    let data = blob("file-1");
    let run = s.prepare(&file_source_xml(&data, "/srv/tpm/vm.tpm"), &[]);
    run.ok();
    let written = std::fs::read(&file).unwrap();
    assert_eq!(linear::permall(&written).unwrap(), Some(&data[..]), "{run}");
    assert_eq!(written, linear::build(&data).unwrap());
    assert_eq!(mode(&file), 0o600);
    let (_, _, uid, gid) = current_user();
    assert_eq!(owner(&file), (uid, gid));
    assert!(!s.live_dir().exists(), "wrote the default dir too\n{run}");
    assert_eq!(names(&s.path("srv/tpm")), vec!["vm.tpm".to_string()]);

    // The same metadata again: nothing to do, the file is not rewritten.
    let ino = std::fs::metadata(&file).unwrap().ino();
    s.prepare(&file_source_xml(&data, "/srv/tpm/vm.tpm"), &[])
        .ok();
    assert_eq!(std::fs::metadata(&file).unwrap().ino(), ino);

    // A local file swtpm wrote (permall, then volatile state) that differs
    // from newer metadata: replaced, its permall kept as a backup.
    let local = blob("file-local");
    let mut swtpm_file = linear::build(&local).unwrap();
    swtpm_file.extend_from_slice(&[0u8; 64]);
    let at = 12 + 12; // slot 1: the volatile state
    let vol_offset = (swtpm_file.len() - 64) as u32;
    swtpm_file[at..at + 4].copy_from_slice(&vol_offset.to_le_bytes());
    swtpm_file[at + 4..at + 8].copy_from_slice(&64u32.to_le_bytes());
    swtpm_file[at + 8..at + 12].copy_from_slice(&64u32.to_le_bytes());
    std::fs::write(&file, &swtpm_file).unwrap();
    let newer = blob("file-2");
    let base = prepare_xml();
    let uuid = fixture_uuid(&base);
    let xml = with_element(&base, &element(&uuid, TpmVersion::V2_0, &newer, 2)).replace(
        "<backend type='emulator' version='2.0'/>",
        "<backend type='emulator' version='2.0'>\n        <source type='file' path='/srv/tpm/vm.tpm'/>\n      </backend>",
    );
    // `prepare` must write the newer metadata's state into the file.
    let restores_newer = || {
        let run = s.prepare(&xml, &[]);
        run.ok();
        let want = linear::build(&newer).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), want, "{run}");
        run
    };
    let run = restores_newer();
    assert_eq!(backup_contents(&s), vec![local], "{run}");

    // An empty file (swtpm had not formatted it yet) holds no state: the
    // metadata's state is written into it, nothing is backed up.
    std::fs::write(&file, b"").unwrap();
    let run = restores_newer();
    assert_eq!(backups(&s).len(), 1, "{run}");

    // A formatted file whose permall slot is allocated but empty holds no
    // state either.
    let mut empty_slot = linear::build(&newer).unwrap();
    empty_slot[12 + 4..12 + 8].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(linear::permall(&empty_slot).unwrap(), Some(&[][..]));
    std::fs::write(&file, &empty_slot).unwrap();
    let run = restores_newer();
    assert_eq!(backups(&s).len(), 1, "{run}");
}

/// A hostile `<source type='file'>`: a symlink or hard link in its place, a
/// path outside the allowed dirs, a file that is not swtpm's: refused
/// before anything is written.
#[test]
fn source_file_links_bad_paths_and_foreign_files_are_refused() {
    let data = blob("hostile-file");
    // A symlink to a host file where the state file goes.
    let s = file_scratch();
    std::os::unix::fs::symlink(s.path("elsewhere/host-file"), s.path("srv/tpm/vm.tpm")).unwrap();
    let run = s.refused("prepare", &file_source_xml(&data, "/srv/tpm/vm.tpm"), 7);
    assert!(run.err().contains("symlink"), "{run}");
    // A hard link to a host file.
    let s = file_scratch();
    std::fs::hard_link(s.path("elsewhere/host-file"), s.path("srv/tpm/vm.tpm")).unwrap();
    let run = s.refused("prepare", &file_source_xml(&data, "/srv/tpm/vm.tpm"), 7);
    assert!(run.err().contains("hard link"), "{run}");
    // Outside the allowed dirs: a host file is never replaced.
    let s = file_scratch();
    let run = s.refused(
        "prepare",
        &file_source_xml(&data, "/elsewhere/host-file"),
        7,
    );
    assert!(run.err().contains("state_path_prefixes"), "{run}");
    // A parent dir that is a symlink.
    let s = file_scratch();
    std::os::unix::fs::symlink(s.path("elsewhere"), s.path("srv/tpm/sub")).unwrap();
    s.refused(
        "prepare",
        &file_source_xml(&data, "/srv/tpm/sub/host-file"),
        7,
    );
    // A regular file that is not a swtpm linear file: not ours to replace.
    let s = file_scratch();
    s.write("srv/tpm/vm.tpm", "not a TPM state\n");
    let run = s.refused("prepare", &file_source_xml(&data, "/srv/tpm/vm.tpm"), 7);
    assert!(
        run.err().contains("swtpmlin") || run.err().contains("linear"),
        "{run}"
    );
    assert!(!run.err().contains("not a TPM state"), "{run}");
}
