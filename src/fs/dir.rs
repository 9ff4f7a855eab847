//! [`Dir`]: a directory held by its fd, reached by the trust rule, and the
//! only primitives that touch what is below it.

use super::error::{io_err, FsError};
use super::owner::Owner;
use super::walk::open_entry;
use crate::fault;
use crate::state::StateFile;
use nix::errno::Errno;
use nix::fcntl::{renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, fsync, unlinkat, Gid, Uid, UnlinkatFlags};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Most entries one tree removal unlinks before it gives up with an error
/// (a swtpm state dir holds a handful; only a planted tree comes near).
pub(crate) const MAX_REMOVE_ENTRIES: usize = 100_000;

const S_ISVTX: u32 = 0o1000;

/// A directory, held open. `trusted`: every directory on the way to it is
/// one only root (or this process's user) can change (see [`crate::fs`]).
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    trusted: bool,
    uid: u32,
    mode: u32,
}

/// What an entry below a [`Dir`] is, seen without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Missing,
    /// A regular file with one link.
    File,
    /// A regular file with more than one name.
    HardLink,
    Dir,
    Symlink,
    Other,
}

impl Dir {
    pub(super) fn new(fd: OwnedFd, path: PathBuf, trusted: bool, st: &FileStat) -> Self {
        Dir {
            fd,
            path,
            trusted,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        }
    }

    /// The directory's path, for messages only (never opened by name).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether nobody but root (or this process's user) can change what
    /// this directory's path names.
    pub(crate) fn trusted(&self) -> bool {
        self.trusted
    }

    /// Whether an entry owned by `entry_uid` in this directory can be
    /// replaced only by root or this process's user: the directory is
    /// theirs and not group/other-writable, or sticky and the entry theirs.
    pub(super) fn protects(&self, entry_uid: u32) -> bool {
        self.writable_only_by_us()
            || (ours(self.uid) && self.mode & S_ISVTX != 0 && ours(entry_uid))
    }

    /// Whether only root (or this process's user) can add, rename or remove
    /// entries here.
    pub(crate) fn writable_only_by_us(&self) -> bool {
        ours(self.uid) && self.mode & 0o022 == 0
    }

    /// Whether what this process creates here stays as it made it: only then
    /// are directories created (and later chowned) in it.
    fn guards_new_entries(&self) -> bool {
        self.trusted && self.protects(nix::unistd::geteuid().as_raw())
    }

    fn shown(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens the subdirectory `name`, never through a link. `Ok(None)`: it
    /// does not exist.
    pub(crate) fn open_subdir(&self, name: &str) -> Result<Option<Dir>, FsError> {
        let at = self.shown(name);
        let fd = match open_entry(&self.fd, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                return Err(FsError::unsafe_path(at, "a symlink or not a directory"))
            }
            Err(e) => return Err(io_err("open", &at, e)),
        };
        let st = fstat(&fd).map_err(|e| io_err("stat", &at, e))?;
        let trusted = self.trusted && self.protects(st.st_uid);
        Ok(Some(Dir::new(fd, at, trusted, &st)))
    }

    /// Opens the directory `rel` below this one, component by component,
    /// never following a link. `Ok(None)`: a component does not exist.
    pub(crate) fn open_beneath(&self, rel: &Path) -> Result<Option<Dir>, FsError> {
        let mut cur = self.try_clone()?;
        for comp in rel.components() {
            let std::path::Component::Normal(name) = comp else {
                return Err(FsError::unsafe_path(
                    self.path.join(rel),
                    "not a plain relative path",
                ));
            };
            match cur.open_subdir(&name.to_string_lossy())? {
                Some(next) => cur = next,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    fn try_clone(&self) -> Result<Dir, FsError> {
        Ok(Dir {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| io_err("open", &self.path, e))?,
            path: self.path.clone(),
            trusted: self.trusted,
            uid: self.uid,
            mode: self.mode,
        })
    }

    /// Opens the subdirectory `name`, creating it with `mode` (root's, or
    /// this process user's) when it is missing. Only in a directory that
    /// protects new entries; an existing directory is opened as it is.
    pub(crate) fn ensure_subdir(&self, name: &str, mode: u32) -> Result<Dir, FsError> {
        if let Some(d) = self.open_subdir(name)? {
            return Ok(d);
        }
        match self.make_subdir(name, mode) {
            Ok(created) => Ok(created),
            // Another process made it meanwhile: use it as it is.
            Err(FsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                self.open_subdir(name)?
                    .ok_or_else(|| io_err("open", &self.shown(name), Errno::ENOENT))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the subdirectory `name` (it must not exist), mode `mode`.
    fn make_subdir(&self, name: &str, mode: u32) -> Result<Dir, FsError> {
        let at = self.shown(name);
        if !self.guards_new_entries() {
            return Err(FsError::unsafe_path(
                self.path.clone(),
                "a directory a user other than root can change, so virt-tpm-state creates no directory in it",
            ));
        }
        mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| io_err("create", &at, e))?;
        let mut d = self
            .open_subdir(name)?
            .ok_or_else(|| io_err("open", &at, Errno::ENOENT))?;
        // What we hold must be what we made: a directory of ours. Only then
        // is its mode set.
        let st = fstat(&d.fd).map_err(|e| io_err("stat", &at, e))?;
        if st.st_uid != nix::unistd::geteuid().as_raw()
            || FileType::from_raw_mode(st.st_mode) != FileType::Directory
        {
            return Err(FsError::unsafe_path(at, "replaced while being created"));
        }
        fchmod(&d.fd, Mode::from_bits_truncate(mode)).map_err(|e| io_err("chmod", &at, e))?;
        d.mode = mode;
        Ok(d)
    }

    /// What `name` is, without following it.
    pub(crate) fn entry(&self, name: &str) -> Result<EntryKind, FsError> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile if st.st_nlink == 1 => EntryKind::File,
                FileType::RegularFile => EntryKind::HardLink,
                FileType::Directory => EntryKind::Dir,
                FileType::Symlink => EntryKind::Symlink,
                _ => EntryKind::Other,
            }),
            Err(Errno::ENOENT) => Ok(EntryKind::Missing),
            Err(e) => Err(io_err("stat", &self.shown(name), e)),
        }
    }

    /// `name` must be a regular, singly-linked file or missing: `Ok(true)`
    /// when it exists.
    pub(crate) fn check_file(&self, name: &str) -> Result<bool, FsError> {
        match self.entry(name)? {
            EntryKind::Missing => Ok(false),
            EntryKind::File => Ok(true),
            EntryKind::HardLink => Err(FsError::unsafe_path(
                self.shown(name),
                "a hard link (more than one name)",
            )),
            _ => Err(FsError::unsafe_path(
                self.shown(name),
                "a symlink or not a regular file",
            )),
        }
    }

    /// Size and modification time of `name` (never through a link).
    pub(crate) fn size_and_modified(&self, name: &str) -> Option<(u64, SystemTime)> {
        let st = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        Some((
            u64::try_from(st.st_size).unwrap_or(0),
            SystemTime::UNIX_EPOCH
                + std::time::Duration::new(secs, st.st_mtime_nsec.try_into().unwrap_or(0)),
        ))
    }

    /// The modification time of the file `name` (never through a link).
    pub(crate) fn modified(&self, name: &str) -> Option<SystemTime> {
        let st = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
        let secs = u64::try_from(st.st_mtime).ok()?;
        Some(
            SystemTime::UNIX_EPOCH
                + std::time::Duration::new(secs, st.st_mtime_nsec.try_into().unwrap_or(0)),
        )
    }

    /// Reads the regular, singly-linked file `name`, at most `max` bytes.
    /// `Ok(None)`: it does not exist.
    pub(crate) fn read_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, FsError> {
        let shown = self.shown(name);
        let fd = match open_entry(&self.fd, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(FsError::unsafe_path(shown, "a symlink")),
            Err(e) => return Err(io_err("open", &shown, e)),
        };
        let st = fstat(&fd).map_err(|e| io_err("stat", &shown, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FsError::unsafe_path(shown, "not a regular file"));
        }
        if st.st_nlink != 1 {
            return Err(FsError::unsafe_path(
                shown,
                "a hard link (more than one name)",
            ));
        }
        let size = st.st_size as u64;
        if size > max {
            return Err(FsError::TooLarge {
                path: shown,
                size,
                limit: max,
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        File::from(fd)
            .take(max.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| io_err("read", &shown, e))?;
        if data.len() as u64 > max {
            return Err(FsError::TooLarge {
                path: shown,
                size: data.len() as u64,
                limit: max,
            });
        }
        Ok(Some(data))
    }

    /// Creates `name` with `data` and `mode`; never overwrites anything.
    pub(crate) fn create_new_file(
        &self,
        name: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<(), FsError> {
        let shown = self.shown(name);
        let fd = open_entry(
            &self.fd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            mode,
        )
        .map_err(|e| io_err("create (it must not exist yet)", &shown, e))?;
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(|e| io_err("chmod", &shown, e))?;
        let mut f = File::from(fd);
        f.write_all(data).map_err(|e| io_err("write", &shown, e))?;
        f.sync_all().map_err(|e| io_err("fsync", &shown, e))
    }

    /// Replaces the file `name` with `data`, owned by `owner` with `mode`: a
    /// temp file created `O_EXCL|O_NOFOLLOW` here (this dir may be writable
    /// by a less trusted user), `fchown`/`fchmod` on its fd, fsync, `rename`
    /// over the target (a planted symlink is replaced, never followed),
    /// fsync of the dir. Readers see the old file or the new one.
    /// `points`: fault points after create, before write, before rename,
    /// after rename (test builds only).
    pub(crate) fn replace_file(
        &self,
        name: &str,
        data: &[u8],
        (owner, mode): (Owner, u32),
        temp_prefix: &str,
        points: [&'static str; 4],
    ) -> Result<(), FsError> {
        let point = |i: usize| fault::point(points[i]);
        let target = self.shown(name);
        let temp = format!("{temp_prefix}{}", unique_suffix());
        let temp_path = self.shown(&temp);
        let fd = open_entry(
            &self.fd,
            &temp,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            mode,
        )
        .map_err(|e| io_err("create", &temp_path, e))?;
        let result = (|| {
            point(0).map_err(|e| io_err("create", &temp_path, e))?;
            set_owner_mode(&fd, owner, mode, &temp_path, FileType::RegularFile)?;
            let mut f = File::from(fd);
            point(1).map_err(|e| io_err("write", &temp_path, e))?;
            f.write_all(data)
                .map_err(|e| io_err("write", &temp_path, e))?;
            f.sync_all().map_err(|e| io_err("fsync", &temp_path, e))?;
            point(2).map_err(|e| io_err("rename into place", &target, e))?;
            renameat2(
                &self.fd,
                temp.as_str(),
                &self.fd,
                name,
                RenameFlags::empty(),
            )
            .map_err(|e| io_err("rename into place", &target, e))?;
            let _ = point(3);
            self.sync()
        })();
        if result.is_err() {
            let _ = unlinkat(&self.fd, temp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Replaces `name` with `data` (this process's own file, `mode`)
    /// atomically, as [`Dir::replace_file`] does.
    pub(crate) fn write_file_atomically(
        &self,
        name: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<(), FsError> {
        self.replace_file(
            name,
            data,
            (Owner::current(), mode),
            &format!(".{name}{TEMP_MARK}"),
            ["file.created", "file.write", "file.rename", "file.renamed"],
        )
    }

    /// Writes a hint file: `data` appended to `name` (`append`), or in
    /// place of its content; created `mode` when missing, never through a
    /// link, with one `write(2)` (short appends of concurrent writers never
    /// interleave). No temp file, no fsync and no fault point: a reader must
    /// take a torn or empty hint as no hint.
    pub(crate) fn write_hint(
        &self,
        name: &str,
        data: &[u8],
        mode: u32,
        append: bool,
    ) -> Result<(), FsError> {
        let path = self.shown(name);
        let how = if append {
            OFlag::O_APPEND
        } else {
            OFlag::O_TRUNC
        };
        let fd = open_entry(&self.fd, name, OFlag::O_WRONLY | OFlag::O_CREAT | how, mode)
            .map_err(|e| io_err("open", &path, e))?;
        let written = nix::unistd::write(&fd, data).map_err(|e| io_err("write", &path, e))?;
        if written != data.len() {
            return Err(io_err("write", &path, Errno::EIO));
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<(), FsError> {
        fsync(&self.fd).map_err(|e| io_err("fsync", &self.path, e))
    }

    /// Replaces the directory `leaf` with one holding exactly `files`, owned
    /// by `owner` (dir 0700, files 0600): built aside under
    /// `.<leaf>.vts-new.*`, fsynced, swapped in with one `renameat2`
    /// (`RENAME_NOREPLACE`, or `RENAME_EXCHANGE` over an existing one); the
    /// replaced tree is then removed. Only in a directory that protects new
    /// entries (so the temp dir stays ours until it is swapped in).
    pub(crate) fn replace_dir(
        &self,
        leaf: &str,
        files: &[StateFile],
        owner: Owner,
    ) -> Result<(), FsError> {
        let target = self.shown(leaf);
        match self.entry(leaf)? {
            EntryKind::Missing | EntryKind::Dir => {}
            _ => return Err(FsError::unsafe_path(target, "a symlink or not a directory")),
        }
        self.remove_leftovers_of(leaf);
        let temp = format!(".{leaf}{TEMP_MARK}{}", unique_suffix());
        let temp_path = self.shown(&temp);
        let built = fault::point("dir.created")
            .map_err(|e| io_err("create", &temp_path, e))
            .and_then(|()| self.make_subdir(&temp, DIR_MODE))
            .and_then(|d| fill_dir(&d, files, owner))
            .and_then(|()| fault::point("dir.filled").map_err(|e| io_err("fsync", &temp_path, e)));
        if let Err(e) = built {
            self.remove_quietly(&temp, leaf);
            return Err(e);
        }
        let swapped = match fault::point("dir.rename") {
            Err(e) => Err(e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)),
            Ok(()) => match renameat2(
                &self.fd,
                temp.as_str(),
                &self.fd,
                leaf,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => Ok(false),
                Err(Errno::EEXIST) => renameat2(
                    &self.fd,
                    temp.as_str(),
                    &self.fd,
                    leaf,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .map(|()| true),
                Err(e) => Err(e),
            },
        };
        if swapped.is_ok() {
            // Swapped in; a kill here leaves the old dir at the temp name.
            let _ = fault::point("dir.swapped");
        }
        match swapped {
            Ok(true) => {
                // The old state dir now sits at the temp name: rename it out
                // of the way first, so a crash here leaves a recognisable
                // leftover, then remove it.
                let old = format!(".{leaf}{OLD_MARK}{}", unique_suffix());
                let at = match renameat2(
                    &self.fd,
                    temp.as_str(),
                    &self.fd,
                    old.as_str(),
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) => old,
                    Err(_) => temp,
                };
                self.remove_quietly(&at, leaf);
                let _ = fault::point("dir.old_removed");
            }
            Ok(false) => {}
            Err(e) => {
                self.remove_quietly(&temp, leaf);
                return Err(io_err("rename into place", &target, e));
            }
        }
        self.sync()
    }

    /// Removes `name` (a tree of `leaf`'s) and says so loudly when it cannot:
    /// what is left has a leftover name the next run removes.
    fn remove_quietly(&self, name: &str, leaf: &str) {
        if let Err(e) = self.remove_tree(name, &format!(".{leaf}{OLD_MARK}")) {
            log::warn!("{e}");
        }
    }

    /// Removes what interrupted earlier runs left beside `leaf`
    /// (`.<leaf>.vts-new.*`, `.<leaf>.vts-old.*`). Failures are logged: they
    /// never affect libvirt, and the next run tries again.
    pub(crate) fn remove_leftovers_of(&self, leaf: &str) {
        let new_prefix = format!(".{leaf}{TEMP_MARK}");
        let old_prefix = format!(".{leaf}{OLD_MARK}");
        self.remove_matching(
            |n| n.starts_with(&new_prefix) || n.starts_with(&old_prefix),
            leaf,
        );
    }

    /// Removes every entry whose name `matches` (files, links, and trees
    /// where this dir protects new entries). Failures are logged.
    pub(crate) fn remove_matching(&self, matches: impl Fn(&str) -> bool, leaf: &str) {
        let names = match self.list() {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{e}");
                return;
            }
        };
        for name in names.iter().filter(|n| matches(n)) {
            let result = match self.entry(name) {
                Ok(EntryKind::Dir) if self.guards_new_entries() => {
                    self.remove_tree(name, &format!(".{leaf}{OLD_MARK}"))
                }
                Ok(EntryKind::Dir) => Ok(()),
                Ok(_) => self.remove_file(name),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                log::warn!("{e}");
            }
        }
    }

    /// Removes the file (or link) `name`; a missing one is fine.
    pub(crate) fn remove_file(&self, name: &str) -> Result<(), FsError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EISDIR) => Err(FsError::unsafe_path(
                self.shown(name),
                "a directory where a file was expected",
            )),
            Err(e) => Err(io_err("remove", &self.shown(name), e)),
        }
    }

    /// Removes `name` and everything below it, never following a link, with
    /// no depth limit: a subdirectory found inside is first moved up into
    /// this directory under `<moved_prefix><unique>` (so an interrupted
    /// removal leaves only names the caller's leftover rule matches) and
    /// removed from there. At most [`MAX_REMOVE_ENTRIES`] entries, then it
    /// fails naming the tree.
    pub(crate) fn remove_tree(&self, name: &str, moved_prefix: &str) -> Result<(), FsError> {
        self.remove_tree_within(name, moved_prefix, MAX_REMOVE_ENTRIES)
    }

    pub(super) fn remove_tree_within(
        &self,
        name: &str,
        moved_prefix: &str,
        limit: usize,
    ) -> Result<(), FsError> {
        let mut budget = limit;
        let mut queue = vec![name.to_string()];
        let too_many = || FsError::TooManyEntries {
            path: self.shown(name),
            limit,
        };
        while let Some(current) = queue.pop() {
            budget = budget.checked_sub(1).ok_or_else(too_many)?;
            match unlinkat(&self.fd, current.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => continue,
                Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
                Err(e) => return Err(io_err("remove", &self.shown(&current), e)),
            }
            let Some(dir) = (match self.open_subdir(&current) {
                Ok(d) => d,
                // Replaced by a link meanwhile: unlink that on the next turn.
                Err(FsError::Unsafe { .. }) => {
                    queue.push(current);
                    continue;
                }
                Err(e) => return Err(e),
            }) else {
                continue;
            };
            for entry in dir.list()? {
                budget = budget.checked_sub(1).ok_or_else(too_many)?;
                match unlinkat(&dir.fd, entry.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(Errno::EISDIR) | Err(Errno::EPERM) => {
                        let moved = format!("{moved_prefix}{}", unique_suffix());
                        renameat2(
                            &dir.fd,
                            entry.as_str(),
                            &self.fd,
                            moved.as_str(),
                            RenameFlags::RENAME_NOREPLACE,
                        )
                        .map_err(|e| io_err("move aside", &dir.shown(&entry), e))?;
                        queue.push(moved);
                    }
                    Err(e) => return Err(io_err("remove", &dir.shown(&entry), e)),
                }
            }
            match unlinkat(&self.fd, current.as_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                // Something was added meanwhile: go round again (bounded).
                Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => queue.push(current),
                Err(e) => return Err(io_err("remove", &self.shown(&current), e)),
            }
        }
        Ok(())
    }

    /// The names in this directory (without `.` and `..`).
    pub(crate) fn list(&self) -> Result<Vec<String>, FsError> {
        let mut out = Vec::new();
        // Its own open file description: listing never moves this fd's offset.
        let mut d = nix::dir::Dir::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("list", &self.path, e))?;
        for entry in d.iter() {
            let entry = entry.map_err(|e| io_err("list", &self.path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Opens (creating it 0600 when missing) the lock file `name`.
    pub(crate) fn open_lock_file(&self, name: &str) -> Result<File, FsError> {
        let shown = self.shown(name);
        open_entry(&self.fd, name, OFlag::O_RDWR | OFlag::O_CREAT, FILE_MODE)
            .map(File::from)
            .map_err(|e| match e {
                Errno::ELOOP => FsError::unsafe_path(shown, "a symlink"),
                e => io_err("open", &shown, e),
            })
    }
}

/// What an entry is, from its `st_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileType {
    RegularFile,
    Directory,
    Symlink,
    /// A device, fifo or socket: never ours.
    Other,
}

impl FileType {
    pub(super) fn from_raw_mode(mode: u32) -> Self {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => FileType::RegularFile,
            SFlag::S_IFDIR => FileType::Directory,
            SFlag::S_IFLNK => FileType::Symlink,
            _ => FileType::Other,
        }
    }
}

/// Root, or the user this process runs as: the users the trust rule trusts.
fn ours(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

pub(super) const DIR_MODE: u32 = 0o700;
pub(super) const FILE_MODE: u32 = 0o600;
pub(super) const TEMP_MARK: &str = ".vts-new.";
pub(super) const OLD_MARK: &str = ".vts-old.";

fn fill_dir(dir: &Dir, files: &[StateFile], owner: Owner) -> Result<(), FsError> {
    for f in files {
        let path = dir.shown(&f.name);
        let fd = open_entry(
            &dir.fd,
            &f.name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            FILE_MODE,
        )
        .map_err(|e| io_err("create", &path, e))?;
        set_owner_mode(&fd, owner, FILE_MODE, &path, FileType::RegularFile)?;
        let mut file = File::from(fd);
        fault::point("dir.write").map_err(|e| io_err("write", &path, e))?;
        file.write_all(&f.data)
            .map_err(|e| io_err("write", &path, e))?;
        file.sync_all().map_err(|e| io_err("fsync", &path, e))?;
    }
    set_owner_mode(&dir.fd, owner, DIR_MODE, &dir.path, FileType::Directory)?;
    dir.sync()
}

/// `fchown`/`fchmod` on an fd this process created, after checking that it
/// is what was created (type, and still this process user's).
fn set_owner_mode(
    fd: &OwnedFd,
    owner: Owner,
    mode: u32,
    path: &Path,
    kind: FileType,
) -> Result<(), FsError> {
    let st = fstat(fd).map_err(|e| io_err("stat", path, e))?;
    if FileType::from_raw_mode(st.st_mode) != kind {
        return Err(FsError::unsafe_path(path, "replaced while being created"));
    }
    if st.st_uid != owner.uid || st.st_gid != owner.gid {
        if st.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(FsError::unsafe_path(path, "replaced while being created"));
        }
        fchown(
            fd,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )
        .map_err(|e| io_err("chown", path, e))?;
    }
    fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|e| io_err("chmod", path, e))
}

/// A name unique to this process and moment, for temp entries.
pub(super) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}.{nanos:09}.{n}", std::process::id())
}
