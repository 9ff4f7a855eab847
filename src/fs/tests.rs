//! The trust rule and the tree removal, on real directories.

use super::*;
use crate::state::{StateFile, TpmVersion};
use std::os::unix::fs::{symlink, PermissionsExt};

fn scratch() -> (tempfile::TempDir, Paths) {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = Paths::with_root(t.path());
    (t, paths)
}

/// Makes `p` with `mode`, and any missing parent 0755, each chmod-ed
/// explicitly: `created_dirs_get_their_mode_whatever_the_umask` sets the
/// process-wide umask to 000 while other tests run, and a parent made 0777
/// then would be a dir the trust rule rightly refuses.
fn mkdir(p: &Path, mode: u32) {
    let mut missing = Vec::new();
    let mut cur = p;
    while !cur.exists() {
        missing.push(cur);
        cur = cur.parent().expect("below the scratch dir");
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_link_made_in_a_trusted_dir_is_followed_above_the_anchor() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("var/lib"), 0o755);
    mkdir(&t.path().join("srv/big/libvirt/swtpm"), 0o711);
    // The admin moved /var/lib/libvirt to a bigger disk.
    symlink("../../srv/big/libvirt", t.path().join("var/lib/libvirt")).unwrap();
    let dir = Anchor::SwtpmBase.open(&paths).unwrap().expect("reached");
    assert!(dir.trusted());
    assert!(
        dir.path().ends_with("srv/big/libvirt/swtpm"),
        "{:?}",
        dir.path()
    );
}

#[test]
fn the_anchor_itself_is_never_a_link() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("var/lib/libvirt"), 0o755);
    mkdir(&t.path().join("elsewhere"), 0o755);
    symlink("../../../elsewhere", t.path().join("var/lib/libvirt/swtpm")).unwrap();
    let e = Anchor::SwtpmBase.open(&paths).unwrap_err();
    assert_eq!(e.exit_code(), crate::exit::Exit::UnsafePath, "{e}");
    assert!(e.to_string().contains("symlink"), "{e}");
}

#[test]
fn a_link_in_a_dir_others_can_write_is_refused() {
    let (t, paths) = scratch();
    // /var/lib writable by others: its libvirt entry (above the anchor, where
    // a root-made link would be followed) is theirs to swap.
    mkdir(&t.path().join("var/lib"), 0o777);
    mkdir(&t.path().join("victim/swtpm"), 0o711);
    symlink("../../victim", t.path().join("var/lib/libvirt")).unwrap();
    let e = Anchor::SwtpmBase.open(&paths).unwrap_err();
    assert_eq!(e.exit_code(), crate::exit::Exit::UnsafePath, "{e}");
    assert!(
        e.to_string().contains("a user other than root can change"),
        "{e}"
    );
    // The same link in a root-only /var/lib is followed.
    std::fs::set_permissions(
        t.path().join("var/lib"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    assert!(Anchor::SwtpmBase.open(&paths).unwrap().is_some());
    // A real dir below an untrusted one is reached, but not trusted.
    mkdir(&t.path().join("var/lib/libvirt-real/qemu/nvram"), 0o755);
    std::fs::set_permissions(
        t.path().join("var/lib/libvirt-real/qemu"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::fs::remove_file(t.path().join("var/lib/libvirt")).unwrap();
    std::fs::rename(
        t.path().join("var/lib/libvirt-real"),
        t.path().join("var/lib/libvirt"),
    )
    .unwrap();
    let dir = Anchor::NvramDir.open(&paths).unwrap().unwrap();
    assert!(!dir.trusted());
}

#[test]
fn nothing_below_an_anchor_is_followed_with_or_without_openat2() {
    for fallback in [false, true] {
        let (t, paths) = scratch();
        mkdir(&t.path().join("srv/tpm/real"), 0o755);
        symlink("real", t.path().join("srv/tpm/link")).unwrap();
        let anchor = Anchor::Other(PathBuf::from("/srv/tpm"));
        walk::force_openat2_fallback(fallback);
        let dir = anchor.open(&paths).unwrap().unwrap();
        let e = dir.open_beneath(Path::new("link")).unwrap_err();
        assert_eq!(
            e.exit_code(),
            crate::exit::Exit::UnsafePath,
            "fallback {fallback}: {e}"
        );
        assert!(dir.open_beneath(Path::new("real")).unwrap().is_some());
        std::fs::write(t.path().join("srv/tpm/real/f"), b"x").unwrap();
        symlink("real/f", t.path().join("srv/tpm/flink")).unwrap();
        let e = dir.read_file("flink", 10).unwrap_err();
        assert_eq!(
            e.exit_code(),
            crate::exit::Exit::UnsafePath,
            "fallback {fallback}: {e}"
        );
        walk::force_openat2_fallback(false);
    }
}

#[test]
fn created_dirs_get_their_mode_whatever_the_umask() {
    for umask in [0o000, 0o022, 0o077] {
        let (t, paths) = scratch();
        mkdir(&t.path().join("var/lib/libvirt"), 0o755);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
        let loc = StateLocation::default_for(
            &paths,
            &crate::state::DomainUuid::parse("6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11").unwrap(),
            TpmVersion::V2_0,
        );
        let blob = crate::swtpm::synthetic_blob(0, &[7u8; 64]);
        let result = loc.replace(
            TpmVersion::V2_0,
            &[StateFile {
                name: "tpm2-00.permall".into(),
                data: blob,
            }],
            Owner::current(),
        );
        nix::sys::stat::umask(old);
        result.unwrap();
        let mode = |rel: &str| {
            std::fs::metadata(t.path().join(rel))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("var/lib/libvirt/swtpm"), 0o711, "umask {umask:o}");
        assert_eq!(
            mode("var/lib/libvirt/swtpm/6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11"),
            0o711
        );
        assert_eq!(
            mode("var/lib/libvirt/swtpm/6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11/tpm2"),
            0o700
        );
        assert_eq!(
            mode("var/lib/libvirt/swtpm/6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11/tpm2/tpm2-00.permall"),
            0o600
        );
    }
}

#[test]
fn an_existing_dir_keeps_its_mode() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("var/lib/libvirt/swtpm"), 0o755);
    Anchor::SwtpmBase.open_or_create(&paths, 0o711).unwrap();
    let mode = std::fs::metadata(t.path().join("var/lib/libvirt/swtpm"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn a_deep_tree_is_removed_entirely() {
    let (t, paths) = scratch();
    let top = Anchor::Other(PathBuf::from("/d"));
    mkdir(&t.path().join("d"), 0o755);
    let mut p = t.path().join("d/victim");
    for i in 0..300 {
        p.push(format!("level{i}"));
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("f"), b"x").unwrap();
    symlink("/etc/passwd", p.join("link")).unwrap();
    let dir = top.open(&paths).unwrap().unwrap();
    dir.remove_tree("victim", ".victim.vts-old.").unwrap();
    let left: Vec<_> = std::fs::read_dir(t.path().join("d")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(Path::new("/etc/passwd").exists());
}

#[test]
fn a_tree_past_the_entry_budget_fails_loudly() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("d"), 0o755);
    let victim = t.path().join("d/victim");
    std::fs::create_dir_all(&victim).unwrap();
    // Directories cannot be unlinked in the first pass: each costs a turn.
    for i in 0..60 {
        std::fs::create_dir(victim.join(format!("{i}"))).unwrap();
    }
    let dir = Anchor::Other(PathBuf::from("/d"))
        .open(&paths)
        .unwrap()
        .unwrap();
    let e = dir
        .remove_tree_within("victim", ".victim.vts-old.", 100)
        .unwrap_err();
    assert!(matches!(e, FsError::TooManyEntries { .. }), "{e}");
    // What is left carries names the leftover rule finds.
    for entry in std::fs::read_dir(t.path().join("d")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name == "victim" || name.starts_with(".victim.vts-old."),
            "{name}"
        );
    }
}

#[test]
fn a_missing_nvram_dir_is_refused_not_created() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("var/lib/libvirt/qemu"), 0o755);
    let loc = NvramLocation::default_for(&paths, "vm1", crate::state::VarsKind::Nvram).unwrap();
    let e = loc.replace(b"vars", Owner::current()).unwrap_err();
    assert!(matches!(e, FsError::NvramDirMissing { .. }), "{e}");
    assert!(!t.path().join("var/lib/libvirt/qemu/nvram").exists());
}

#[test]
fn our_own_dirs_must_be_ours() {
    let (t, paths) = scratch();
    mkdir(&t.path().join("var/lib/virt-tpm-state"), 0o777);
    let e = Anchor::Data.open(&paths).unwrap_err();
    assert_eq!(e.exit_code(), crate::exit::Exit::UnsafePath, "{e}");
    std::fs::set_permissions(
        t.path().join("var/lib/virt-tpm-state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    assert!(Anchor::Data.open(&paths).unwrap().is_some());
}

#[test]
fn a_revert_intent_reads_back_until_consumed_or_expired() {
    use crate::state::{DomainUuid, Sha256Sum};
    let (t, paths) = scratch();
    let host = HostData::new(&paths);
    let uuid = DomainUuid::parse("6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d").unwrap();
    assert_eq!(host.read_revert(&uuid).unwrap(), None);
    let intent = RevertIntent {
        digest: Sha256Sum::of(b"element"),
        snapshot: "before upgrade\n'x'".into(),
        by: "cli".into(),
    };
    host.write_revert(&uuid, &intent).unwrap();
    assert_eq!(host.read_revert(&uuid).unwrap(), Some(intent.clone()));
    let file = t
        .path()
        .join("var/lib/virt-tpm-state/reverts")
        .join(uuid.as_str());
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    host.clear_revert(&uuid).unwrap();
    assert_eq!(host.read_revert(&uuid).unwrap(), None);
    // Past its time it no longer counts, and goes.
    host.write_revert(&uuid, &intent).unwrap();
    let old = std::time::SystemTime::now() - host::REVERT_TTL - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(host.read_revert(&uuid).unwrap(), None);
    assert!(!file.exists());
    // An unreadable one neither counts nor stays.
    std::fs::write(&file, "vts-revert 2\ndigest zz\n").unwrap();
    assert_eq!(host.read_revert(&uuid).unwrap(), None);
    assert!(!file.exists());
}
