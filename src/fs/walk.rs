//! The trust rule (see the module doc of [`crate::fs`]), implemented once:
//! [`resolve`] walks an anchor's path from the root, and [`open_entry`]
//! opens one entry below a directory fd without following anything.

use super::dir::Dir;
use super::dir::FileType;
use super::error::{io_err, FsError};
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Most symlinks followed while resolving one anchor (the kernel's limit).
const MAX_LINKS: usize = 40;

/// Whether `openat2` is known to be missing (kernel < 5.6): then
/// [`open_entry`] falls back to `openat(O_NOFOLLOW)`, which gives the same
/// guarantee for one component.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// For tests: use the `O_NOFOLLOW` fallback as if `openat2` were missing.
#[cfg(test)]
pub(super) fn force_openat2_fallback(on: bool) {
    NO_OPENAT2.store(on, Ordering::Relaxed);
}

/// Opens the single entry `name` (no `/`) below `dir`, never following a
/// link: `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)`, or `openat(O_NOFOLLOW)` without `openat2`.
/// A link answers `ELOOP` (or `EXDEV`) either way.
pub(super) fn open_entry(
    dir: impl AsFd,
    name: &str,
    flags: OFlag,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    debug_assert!(!name.contains('/') && !name.is_empty());
    let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        use nix::fcntl::{OpenHow, ResolveFlag};
        let how = OpenHow::new()
            .flags(flags)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(
                ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        match nix::fcntl::openat2(dir.as_fd(), name, how) {
            Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            Err(Errno::EXDEV) => return Err(Errno::ELOOP),
            other => return other,
        }
    }
    openat(dir, name, flags, Mode::from_bits_truncate(mode))
}

/// Whether the last component of a resolved path may itself be a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Last {
    /// An anchor: its last component is never followed.
    Anchor,
    /// A directory above an anchor: followed like every other component.
    Parent,
}

/// Resolves the anchor `abs` (absolute) below `root` by the trust rule.
/// `Ok(None)` when a component does not exist.
pub(super) fn resolve(root: &Path, abs: &Path, last_rule: Last) -> Result<Option<Dir>, FsError> {
    let mut pending: VecDeque<(OsString, bool)> = VecDeque::new();
    let comps: Vec<OsString> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let last = comps.len().saturating_sub(1);
    for (i, c) in comps.into_iter().enumerate() {
        pending.push_back((c, i == last && last_rule == Last::Anchor));
    }
    let mut stack = match open_root(root) {
        Ok(r) => vec![r],
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut links = 0;
    while let Some((name, is_anchor)) = pending.pop_front() {
        let cur = stack.last().expect("the root stays");
        match name.as_bytes() {
            b"." => continue,
            b".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let name = name.to_string_lossy().into_owned();
        let at = cur.path().join(&name);
        let st = match fstatat(cur.fd(), name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io_err("stat", &at, e)),
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                if is_anchor {
                    return Err(FsError::unsafe_path(at, "a symlink (a directory of libvirt's or virt-tpm-state's must be a real directory; relocate its parent instead)"));
                }
                if !cur.trusted() || !cur.protects(st.st_uid) {
                    return Err(FsError::unsafe_path(
                        at,
                        "a symlink in a directory a user other than root can change",
                    ));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(FsError::unsafe_path(at, "a chain of too many symlinks"));
                }
                let target = PathBuf::from(
                    readlinkat(cur.fd(), name.as_str())
                        .map_err(|e| io_err("read the link", &at, e))?,
                );
                if target.is_absolute() {
                    // Absolute targets mean what they mean to the kernel:
                    // from the real root.
                    stack = vec![open_root(Path::new("/"))?];
                }
                let mut spliced: Vec<(OsString, bool)> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some((n.to_os_string(), false)),
                        Component::ParentDir => Some((OsString::from(".."), false)),
                        _ => None,
                    })
                    .collect();
                while let Some(c) = spliced.pop() {
                    pending.push_front(c);
                }
            }
            FileType::Directory => match cur.open_subdir(&name)? {
                Some(dir) => stack.push(dir),
                None => return Ok(None),
            },
            _ => return Err(FsError::unsafe_path(at, "not a directory")),
        }
    }
    Ok(stack.pop())
}

/// The walk's starting point: `/`, or the re-root dir a test chose. Trusted
/// by definition (it is where the walk starts, not something it found).
fn open_root(root: &Path) -> Result<Dir, FsError> {
    let fd = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", root, e))?;
    let st: FileStat = fstat(&fd).map_err(|e| io_err("stat", root, e))?;
    Ok(Dir::new(fd, root.to_path_buf(), true, &st))
}
