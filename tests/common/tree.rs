//! Trees compared before and after a run: every entry below a root with
//! kind, owner, mode and content digest, never following a link.

use std::collections::BTreeMap;
use std::path::Path;
use virt_tpm_state::state::Sha256Sum;

/// Markers of our temp and old entries: none may survive a finished run.
pub const LEFTOVER_MARKS: &[&str] = &[".vts-new.", ".vts-old.", ".vts-nvram-new."];

pub fn find_leftovers(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        if LEFTOVER_MARKS.iter().any(|m| name.contains(m)) {
            out.push(rel);
        }
        if e.file_type().unwrap().is_dir() {
            find_leftovers(root, &e.path(), out);
        }
    }
}

/// Owner and mode: uid, gid, mode & 0o7777 (shown as `uid:gid 0mode`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Om(pub u32, pub u32, pub u32);

impl std::fmt::Debug for Om {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} {:04o}", self.0, self.1, self.2)
    }
}

/// Owner and mode of `p`, not following a link.
pub fn stat_of(p: &Path) -> Om {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    Om(m.uid(), m.gid(), m.mode() & 0o7777)
}

/// One entry, never following a link: kind, owner, mode, and for a file
/// the digest of its content, for a link its target ("absent" if none).
pub fn meta_of(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return "absent".into();
    };
    let ft = m.file_type();
    let head = format!("{}:{} {:04o}", m.uid(), m.gid(), m.mode() & 0o7777);
    if ft.is_symlink() {
        let t = std::fs::read_link(p).unwrap_or_default();
        format!("link {head} -> {}", t.display())
    } else if ft.is_dir() {
        format!("dir {head}")
    } else if ft.is_file() {
        let data = std::fs::read(p).unwrap_or_default();
        format!("file {head} {}", Sha256Sum::of(&data).short())
    } else {
        format!("other {head}")
    }
}

/// [`meta_of`] for `dir` (as ".") and everything below it, never following
/// a link; the subtrees at the relative paths in `skip` are listed but not
/// entered.
pub fn meta_tree(dir: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = meta_of(&p);
            let is_dir = meta.starts_with("dir ");
            out.insert(rel.clone(), meta);
            if is_dir && !skip.contains(&rel.as_str()) {
                walk(base, &p, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(".".into(), meta_of(dir));
    walk(dir, dir, skip, &mut out);
    out
}

/// (relative path, uid, gid) of every entry below `dir`, never following a
/// link nor entering the subtrees at `skip` (cheap: no content read).
pub fn owners(dir: &Path, skip: &[&str]) -> Vec<(String, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if m.file_type().is_dir() && !skip.contains(&rel.as_str()) {
                todo.push(p);
            }
            out.push((rel, m.uid(), m.gid()));
        }
    }
    out
}

/// The entries whose [`meta_of`] differs between two [`meta_tree`]s.
pub fn meta_diff(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => d.push(format!("- {k}  ({v})")),
            Some(w) if w != v => d.push(format!("~ {k}  {v}  =>  {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            d.push(format!("+ {k}  ({v})"));
        }
    }
    d
}

pub fn show_meta(t: &BTreeMap<String, String>) -> String {
    t.iter().map(|(k, v)| format!("  {k}  {v}\n")).collect()
}

/// One entry of a [`StatTree`]: every stat field a run could change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub ino: u64,
    pub nlink: u64,
    pub mtime: (i64, i64),
    /// File: sha256 prefix of the content; link: its target.
    pub extra: String,
}

impl Entry {
    /// The line a golden tree (tests/cases) holds for this entry at `rel`:
    /// no inode nor time, the owner `me` when it is the test's user.
    pub fn golden(&self, rel: &str) -> String {
        let owner = if self.uid == nix::unistd::geteuid().as_raw() {
            "me".to_string()
        } else {
            format!("{}:{}", self.uid, self.gid)
        };
        let tail = match self.kind {
            'f' => format!(" {} {}", self.size, self.extra),
            'l' => format!(" {}", self.extra),
            _ => String::new(),
        };
        let mode = if self.kind == 'l' { 0o777 } else { self.mode };
        format!("{} {mode:04o} {owner} {rel}{tail}", self.kind)
    }
}

/// Every entry below a root, by relative path.
pub type StatTree = BTreeMap<String, Entry>;

/// The [`StatTree`] of `root`, never following a link; an entry that
/// vanishes while it is read (a racing hook) is left out.
pub fn stat_tree(root: &Path) -> StatTree {
    use std::os::unix::fs::MetadataExt;
    fn walk(root: &Path, dir: &Path, out: &mut StatTree) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let ft = m.file_type();
            let (kind, extra) = if ft.is_symlink() {
                let target = std::fs::read_link(&p).unwrap_or_default();
                ('l', format!("-> {}", target.display()))
            } else if ft.is_dir() {
                ('d', String::new())
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap_or_default();
                ('f', format!("sha256:{}", Sha256Sum::of(&data).short()))
            } else {
                ('?', String::new())
            };
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: m.size(),
                    ino: m.ino(),
                    nlink: m.nlink(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    extra,
                },
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = StatTree::new();
    walk(root, root, &mut out);
    out
}

/// A listing of `t`, one entry a line, every field.
pub fn show_stat_tree(t: &StatTree) -> String {
    let mut s = String::new();
    for (p, e) in t {
        s.push_str(&format!(
            "  {} {:04o} {:>5}:{:<5} {:>7} ino={:<9} nlink={} {p} {}\n",
            e.kind, e.mode, e.uid, e.gid, e.size, e.ino, e.nlink, e.extra
        ));
    }
    s
}

/// Paths added, removed or changed (in any stat field or content).
pub fn stat_diff(before: &StatTree, after: &StatTree) -> Vec<String> {
    let mut d = Vec::new();
    for (p, e) in after {
        match before.get(p) {
            None => d.push(format!("+ {p}")),
            Some(b) if b != e => d.push(format!("~ {p}")),
            _ => {}
        }
    }
    for p in before.keys() {
        if !after.contains_key(p) {
            d.push(format!("- {p}"));
        }
    }
    d
}
