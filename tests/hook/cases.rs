//! Golden trees (tests/cases/README.md): each `tests/cases/NN-name/` holds
//! an input tree, the domain XML libvirt hands the hook at `prepare begin`
//! and the tree expected after it. One test per case runs the real hook
//! binary against a scratch root holding the input and diffs the whole tree
//! (names, kinds, modes, owners, sizes, content digests); a failure prints
//! the diff and both trees. `VTS_BLESS=1` rewrites `expected.tree` from
//! what the hook did, for a reviewer to read in the diff.

use crate::common::scratch::Scratch;
use crate::common::tree::{stat_diff, stat_tree};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

/// Entries of the scratch root that are no case's business: the lock
/// files (made on the first lock) and qemu.conf (names this run's uid).
fn ignored(rel: &str) -> bool {
    rel == "run" || rel.starts_with("run/") || rel == "etc/libvirt/qemu.conf"
}

/// One line per entry below `root` (`Entry::golden` in tests/common/tree.rs), never following
/// a link.
fn golden_tree(root: &Path) -> BTreeMap<String, String> {
    stat_tree(root)
        .into_iter()
        .filter(|(rel, _)| !ignored(rel))
        .map(|(rel, e)| {
            let line = e.golden(&rel);
            (rel, line)
        })
        .collect()
}

/// Copies `from` into `to`: dirs 0755, files 0644 (git keeps no more),
/// links as links.
fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

fn text(t: &BTreeMap<String, String>) -> String {
    t.values().map(|l| format!("{l}\n")).collect()
}

/// Runs case `name` (a directory of tests/cases): see the module doc.
fn run_case(name: &str) {
    let dir = cases_dir().join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let s = Scratch::new();
    copy_tree(&dir.join("input"), &s.root());
    let xml = read("domain.xml").unwrap_or_else(|| panic!("{name}: no domain.xml"));
    let code: i32 = read("exit").map_or(0, |c| c.trim().parse().expect("exit: a number"));
    let before = text(&golden_tree(&s.root()));
    let stat_before = s.stat_tree();
    let out = if code == 0 {
        let run = s.prepare(&xml, &[]);
        run.ok();
        run
    } else {
        // Every stat field and nothing next to the root: see Scratch::refused.
        let run = s.refused("prepare", &xml, code);
        for want in read("stderr").unwrap_or_default().lines() {
            run.says(&[want]);
        }
        run
    };
    let after = text(&golden_tree(&s.root()));
    // A run that leaves the golden tree as it was wrote nothing at all:
    // no file rewritten with the same content, no inode replaced.
    if after == before {
        let diff: Vec<String> = stat_diff(&stat_before, &s.stat_tree())
            .into_iter()
            .filter(|d| !ignored(&d[2..]))
            .collect();
        assert!(
            diff.is_empty(),
            "{name}: same names and digests, but rewritten: {diff:?}{out}"
        );
    }
    let expected_file = dir.join("expected.tree");
    if std::env::var("VTS_BLESS").as_deref() == Ok("1") {
        std::fs::write(&expected_file, &after).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_file)
        .unwrap_or_else(|e| panic!("{}: {e} (VTS_BLESS=1 writes it)", expected_file.display()));
    if after != expected {
        let (want, got): (Vec<&str>, Vec<&str>) =
            (expected.lines().collect(), after.lines().collect());
        let mut diff = String::new();
        for l in &want {
            if !got.contains(l) {
                diff.push_str(&format!("- {l}\n"));
            }
        }
        for l in &got {
            if !want.contains(l) {
                diff.push_str(&format!("+ {l}\n"));
            }
        }
        panic!(
            "{name}: the tree after prepare differs from expected.tree\n--- diff (- expected, + got)\n{diff}--- input tree\n{before}--- tree after the hook\n{after}--- hook stderr\n{}",
            out.err()
        );
    }
}

/// The cases, one test each (so a failure names its case).
const CASES: &[&str] = &[
    "01-fresh-restore",
    "02-newer-local-kept",
    "03-conflict-refused",
    "04-symlinked-state-dir-refused",
    "05-uefi-vars-restored",
];

#[test]
fn every_case_directory_is_run() {
    let mut dirs: Vec<String> = std::fs::read_dir(cases_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs, CASES,
        "tests/cases and CASES in tests/hook/cases.rs differ"
    );
}

#[test]
fn case_01_fresh_restore() {
    run_case(CASES[0]);
}

#[test]
fn case_02_newer_local_kept() {
    run_case(CASES[1]);
}

#[test]
fn case_03_conflict_refused() {
    run_case(CASES[2]);
}

#[test]
fn case_04_symlinked_state_dir_refused() {
    run_case(CASES[3]);
}

#[test]
fn case_05_uefi_vars_restored() {
    run_case(CASES[4]);
}
