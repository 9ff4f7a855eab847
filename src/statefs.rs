//! All filesystem work: reading and atomically replacing swtpm state dirs,
//! the copies kept at stop, backups, the sync journal, markers and locks.
//!
//! Rules kept here, for a process that runs as root on hostile input:
//! - Below a trusted base (libvirt's swtpm dir, our own data dirs) every
//!   component is opened with `O_NOFOLLOW`, relative to its parent's fd; a
//!   `<source path>` from the domain XML is walked that way from the root.
//! - Only regular files with one link are read; files are created with
//!   `O_EXCL|O_NOFOLLOW` in a fresh directory, so nothing is written through a
//!   link planted by someone else.
//! - A state dir is built aside (`.<name>.vts-new.*`), fsynced, and swapped in
//!   with one `renameat2` (`RENAME_NOREPLACE` or `RENAME_EXCHANGE`): libvirt
//!   never sees an empty or half-written state dir, even if we are killed.

use crate::envelope::{KeyId, Keyring, SecretKey, KEY_LEN};
use crate::fault;
use crate::paths::Paths;
use crate::state::{
    DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, NVRAM_FILE,
};
use rustix::fs::{
    fchmod, fchown, fstat, fsync, mkdirat, openat, renameat_with, statat, unlinkat, AtFlags, Dir,
    FileType, FlockOperation, Mode, OFlags, RenameFlags,
};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How long a "do not restore" marker from `migrate`/`restore begin` is
/// honoured: the `prepare` it is meant for follows within seconds.
pub const MARKER_TTL: Duration = Duration::from_secs(300);

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// libvirt creates `/var/lib/libvirt/swtpm/<uuid>` as 0711 root.
const UUID_DIR_MODE: u32 = 0o711;
/// Upper bound for reading our own kept copies (we wrote them, within the
/// configured per-file cap, which cannot exceed this in practice).
const KEPT_READ_LIMIT: u64 = 64 * 1024 * 1024;
const TEMP_MARK: &str = ".vts-new.";
const OLD_MARK: &str = ".vts-old.";

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path} is {what}; refusing to touch it (never follows or writes through links)")]
    Unsafe { path: PathBuf, what: &'static str },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("TPM state path {path:?} from the domain XML is not usable: {why}")]
    BadSourcePath { path: String, why: &'static str },
    #[error("another virt-tpm-state process has held the lock of {uuid} for {secs}s; try again, or look for a stuck process holding {lock}")]
    LockTimeout {
        uuid: DomainUuid,
        secs: u64,
        lock: PathBuf,
    },
    #[error("user or group {0:?} from qemu.conf does not exist on this host")]
    UnknownOwner(String),
    #[error("TPM state file {path} is not a swtpm state file virt-tpm-state can read ({source}); it was left untouched: keep a copy of it before changing anything")]
    Linear {
        path: PathBuf,
        source: crate::linear::LinearError,
    },
}

impl FsError {
    /// 7: unsafe path, 9: lock timeout, 8: any other filesystem failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            // A file that is not swtpm's where a state file goes is in the
            // way like a link is: refused, left alone.
            FsError::Unsafe { .. } | FsError::BadSourcePath { .. } | FsError::Linear { .. } => 7,
            FsError::LockTimeout { .. } => 9,
            _ => 8,
        }
    }
}

fn io_err(action: &'static str, path: &Path, e: impl Into<std::io::Error>) -> FsError {
    FsError::Io {
        action,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Owner of restored state files: qemu.conf's `swtpm_user:swtpm_group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The user this process runs as (root for our own private files).
    pub fn current() -> Self {
        Owner {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    /// The owner libvirt gives swtpm state: `swtpm_user`/`swtpm_group` from
    /// qemu.conf, defaulting to `tss`, or root where `tss` does not exist.
    pub fn swtpm(paths: &Paths) -> Result<Self, FsError> {
        let conf = std::fs::read_to_string(paths.qemu_conf()).unwrap_or_default();
        let user = conf_value(&conf, "swtpm_user");
        let group = conf_value(&conf, "swtpm_group");
        let uid = match user {
            Some(u) => resolve_user(&u)?,
            None => resolve_user("tss").unwrap_or(0),
        };
        let gid = match group {
            Some(g) => resolve_group(&g)?,
            None => resolve_group("tss").unwrap_or(0),
        };
        Ok(Owner { uid, gid })
    }

    /// The owner libvirt gives a UEFI variable store: qemu.conf's
    /// `user`/`group`, defaulting to libvirt's build defaults
    /// (`libvirt-qemu` on Debian, `qemu` elsewhere), or root where neither
    /// exists.
    pub fn qemu(paths: &Paths) -> Result<Self, FsError> {
        let conf = std::fs::read_to_string(paths.qemu_conf()).unwrap_or_default();
        let uid = match conf_value(&conf, "user") {
            Some(u) => resolve_user(&u)?,
            None => resolve_user("libvirt-qemu")
                .or_else(|_| resolve_user("qemu"))
                .unwrap_or(0),
        };
        let gid = match conf_value(&conf, "group") {
            Some(g) => resolve_group(&g)?,
            None => resolve_group("libvirt-qemu")
                .or_else(|_| resolve_group("qemu"))
                .unwrap_or(0),
        };
        Ok(Owner { uid, gid })
    }
}

/// Reads `key = "value"` from libvirt's qemu.conf syntax (the last one wins,
/// `#` starts a comment).
fn conf_value(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() == key {
            found = Some(v.trim().trim_matches('"').to_string());
        }
    }
    found
}

fn resolve_user(name: &str) -> Result<u32, FsError> {
    if let Some(num) = name.strip_prefix('+') {
        return num
            .parse()
            .map_err(|_| FsError::UnknownOwner(name.to_string()));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(FsError::UnknownOwner(name.to_string())),
    }
}

fn resolve_group(name: &str) -> Result<u32, FsError> {
    if let Some(num) = name.strip_prefix('+') {
        return num
            .parse()
            .map_err(|_| FsError::UnknownOwner(name.to_string()));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(FsError::UnknownOwner(name.to_string())),
    }
}

// ------------------------------------------------------------ locations

/// Where libvirt keeps a domain's swtpm state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// `<base>/<uuid>/<tpm2|tpm1.2>`; `base` is trusted (configured).
    Default {
        base: PathBuf,
        uuid: DomainUuid,
        version: TpmVersion,
    },
    /// `<source type='dir' path=...>`: an absolute path from the domain XML,
    /// walked without following links from the (re-rooted) root.
    Source { root: PathBuf, path: PathBuf },
    /// `<source type='file' path=...>` (libvirt >= 10.10): one file in
    /// swtpm's linear layout ([`crate::linear`]) instead of a dir; its slot 0
    /// is the same permall the dir backend keeps in `tpm2-00.permall`.
    File { root: PathBuf, path: PathBuf },
}

impl StateLocation {
    pub fn default_for(paths: &Paths, uuid: &DomainUuid, version: TpmVersion) -> Self {
        StateLocation::Default {
            base: paths.swtpm_base(),
            uuid: uuid.clone(),
            version,
        }
    }

    /// Validates a `<source type='dir' path=...>` before it goes near the
    /// filesystem: absolute, normal components only.
    ///
    /// The path must lie below one of `allowed` (absolute, not re-rooted):
    /// the XML is hostile, and without this a `<source path='/etc'>` would
    /// have the hook swap out and delete any directory on the host.
    pub fn from_source(paths: &Paths, raw: &str, allowed: &[PathBuf]) -> Result<Self, FsError> {
        Ok(StateLocation::Source {
            root: paths.root().to_path_buf(),
            path: source_leaf_checked(raw, confined(raw, allowed)?)?,
        })
    }

    /// Validates a `<source type='file' path=...>` the same way as a dir
    /// source: the file is replaced on restore, so it is confined likewise.
    pub fn from_source_file(
        paths: &Paths,
        raw: &str,
        allowed: &[PathBuf],
    ) -> Result<Self, FsError> {
        Ok(StateLocation::File {
            root: paths.root().to_path_buf(),
            path: source_leaf_checked(raw, confined(raw, allowed)?)?,
        })
    }

    /// The state dir's (or state file's) full path, for messages.
    pub fn path(&self) -> PathBuf {
        match self {
            StateLocation::Default {
                base,
                uuid,
                version,
            } => base.join(uuid.as_str()).join(version.state_subdir()),
            StateLocation::Source { root, path } | StateLocation::File { root, path } => {
                root.join(path)
            }
        }
    }

    /// Where the state file `name` (e.g. the permall) lives, for messages
    /// and its modification time: inside the state dir, or the one file.
    pub fn file_path(&self, name: &str) -> PathBuf {
        match self {
            StateLocation::File { .. } => self.path(),
            _ => self.path().join(name),
        }
    }

    /// A single state file (`<source type='file'>`) rather than a dir.
    pub fn is_file(&self) -> bool {
        matches!(self, StateLocation::File { .. })
    }

    fn leaf(&self) -> String {
        match self {
            StateLocation::Default { version, .. } => version.state_subdir().to_string(),
            StateLocation::Source { path, .. } | StateLocation::File { path, .. } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Opens the directory that holds the state dir. `create` makes libvirt's
    /// `<base>/<uuid>` (0711 root) when missing; a `<source>` parent is never
    /// created. `Ok(None)`: it does not exist.
    fn open_parent(&self, create: bool) -> Result<Option<(OwnedFd, PathBuf)>, FsError> {
        match self {
            StateLocation::Default { base, uuid, .. } => {
                if create {
                    std::fs::create_dir_all(base).map_err(|e| io_err("create", base, e))?;
                }
                let base_fd = match open_trusted_dir(base) {
                    Ok(fd) => fd,
                    Err(FsError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound && !create =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(e),
                };
                let uuid_path = base.join(uuid.as_str());
                if create {
                    match mkdirat(&base_fd, uuid.as_str(), Mode::from_raw_mode(UUID_DIR_MODE)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err("create", &uuid_path, e)),
                    }
                }
                Ok(open_dir_nofollow(&base_fd, uuid.as_str(), &uuid_path)?
                    .map(|fd| (fd, uuid_path)))
            }
            StateLocation::Source { root, path } | StateLocation::File { root, path } => {
                walk_nofollow(root, path.parent().unwrap_or(Path::new("")))
            }
        }
    }

    /// Reads the state in this location: `None` when the dir or the
    /// permanent-state file is absent (for a state file: absent, empty, or
    /// with no permall yet, as before libvirt's first `swtpm_setup`).
    pub fn read(&self, version: TpmVersion, max: u64) -> Result<Option<TpmState>, FsError> {
        let Some((parent, parent_path)) = self.open_parent(false)? else {
            return Ok(None);
        };
        if let StateLocation::File { .. } = self {
            return read_linear_file(&parent, &self.leaf(), &self.path(), version, max);
        }
        read_state_dir(
            &parent,
            &self.leaf(),
            &parent_path.join(self.leaf()),
            version,
            max,
        )
    }

    /// True when the state dir (state file) exists (even empty).
    pub fn exists(&self) -> Result<bool, FsError> {
        let Some((parent, parent_path)) = self.open_parent(false)? else {
            return Ok(false);
        };
        if let StateLocation::File { .. } = self {
            return check_regular_file(&parent, &self.leaf(), &self.path());
        }
        Ok(open_dir_nofollow(
            &parent,
            self.leaf().as_str(),
            &parent_path.join(self.leaf()),
        )?
        .is_some())
    }

    /// Refuses early (before anything is written) when the state dir or its
    /// parents are links or not directories.
    pub fn check_safe(&self) -> Result<(), FsError> {
        self.exists().map(|_| ())
    }

    /// Removes what an interrupted earlier replace left beside the state dir
    /// or state file (`.<leaf>.vts-new.*`, `.<leaf>.vts-old.*`; call with
    /// the domain's lock held). Best effort: they never affect libvirt, but
    /// a run that then decides to change nothing would otherwise leave them
    /// forever.
    pub fn remove_leftovers(&self) {
        if let Ok(Some((parent, parent_path))) = self.open_parent(false) {
            remove_stale_temps(&parent, &parent_path, &self.leaf());
        }
    }

    /// Replaces the state dir with exactly `files`, owned by `owner`. A
    /// state file is replaced by a linear file holding only the permall
    /// (`version`'s name among `files`), as swtpm lays out a fresh one.
    pub fn replace(
        &self,
        version: TpmVersion,
        files: &[StateFile],
        owner: Owner,
    ) -> Result<(), FsError> {
        let (parent, parent_path) = self.open_parent(true)?.ok_or_else(|| FsError::Io {
            action: "open",
            path: self.path(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        if let StateLocation::File { .. } = self {
            let permall = files
                .iter()
                .find(|f| f.name == version.permall_name())
                .ok_or_else(|| FsError::Linear {
                    path: self.path(),
                    source: crate::linear::LinearError::Empty,
                })?;
            let data = crate::linear::build(&permall.data).map_err(|source| FsError::Linear {
                path: self.path(),
                source,
            })?;
            return replace_file(
                &parent,
                &parent_path,
                &self.leaf(),
                &data,
                (owner, FILE_MODE),
                // Named after the file, so remove_leftovers finds it.
                &format!(".{}{TEMP_MARK}", self.leaf()),
                STATE_FILE_FAULT_POINTS,
            );
        }
        replace_dir(&parent, &parent_path, &self.leaf(), files, owner)
    }
}

/// The last component of a `<source>` path names our temp and old entries
/// beside it (`.<leaf>.vts-new.*`, `.<leaf>.vts-old.*`), and leftovers are
/// found by that prefix in a dir other domains may share. So the leaf may
/// not look like one of those names (or it could match another domain's
/// prefix), and it must leave room for the suffix within NAME_MAX.
fn source_leaf_checked(raw: &str, path: PathBuf) -> Result<PathBuf, FsError> {
    let leaf = path
        .file_name()
        .map(|l| l.to_string_lossy())
        .unwrap_or_default();
    let why = if leaf.starts_with('.') {
        Some("its last component starts with '.'")
    } else if leaf.contains(TEMP_MARK) || leaf.contains(OLD_MARK) {
        Some("its last component contains a name virt-tpm-state uses for temp files")
    } else if leaf.len() > 200 {
        Some("its last component is longer than 200 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(FsError::BadSourcePath {
            path: raw.to_string(),
            why,
        }),
        None => Ok(path),
    }
}

/// Validates an absolute path from the domain XML (`<source path>`,
/// `<nvram>`) before it goes near the filesystem: absolute, no NUL, normal
/// components only. Returns it relative to the root.
fn confined(raw: &str, allowed: &[PathBuf]) -> Result<PathBuf, FsError> {
    let path = validated_abs_path(raw)?;
    let inside = allowed.iter().any(|prefix| {
        let prefix = prefix.strip_prefix("/").unwrap_or(prefix);
        !prefix.as_os_str().is_empty() && path.starts_with(prefix) && path != prefix
    });
    if !inside {
        return Err(FsError::BadSourcePath {
            path: raw.to_string(),
            why: "outside the directories virt-tpm-state may write (libvirt's own, or state_path_prefixes in /etc/virt-tpm-state/config.toml)",
        });
    }
    Ok(path)
}

fn validated_abs_path(raw: &str) -> Result<PathBuf, FsError> {
    let bad = |why| FsError::BadSourcePath {
        path: raw.to_string(),
        why,
    };
    if raw.len() > 4096 || raw.contains('\0') {
        return Err(bad("too long or contains NUL"));
    }
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(bad("not an absolute path"));
    }
    // Path::components() silently drops "." and repeated "/": check
    // the raw segments so what we walk is exactly what was written.
    if raw[1..]
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad("contains '.', '..' or an empty component"));
    }
    let mut clean = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => clean.push(n),
            _ => return Err(bad("contains '.' or '..'")),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(bad("is the root directory"));
    }
    Ok(clean)
}

/// Walks the directories of `rel` (relative to `root`) without following
/// links; `Ok(None)` when one does not exist.
fn walk_nofollow(root: &Path, rel: &Path) -> Result<Option<(OwnedFd, PathBuf)>, FsError> {
    let mut fd = open_trusted_dir(root)?;
    let mut at = root.to_path_buf();
    for comp in rel.components() {
        let name = comp.as_os_str();
        at.push(name);
        match open_dir_nofollow(&fd, name, &at)? {
            Some(next) => fd = next,
            None => return Ok(None),
        }
    }
    Ok(Some((fd, at)))
}

// ------------------------------------------------------------ UEFI NVRAM

/// Longest domain name that can become `<name>_VARS.fd` (255-byte names).
const MAX_NVRAM_NAME: usize = 255 - "_VARS.fd".len();
/// Mode libvirt gives a VARS file (and our temp file while it is written).
const NVRAM_MODE: u32 = 0o600;
const NVRAM_TEMP: &str = ".vts-nvram-new.";
const STATE_FILE_FAULT_POINTS: [&str; 4] = [
    "statefile.created",
    "statefile.write",
    "statefile.rename",
    "statefile.renamed",
];
const NVRAM_FAULT_POINTS: [&str; 4] = [
    "nvram.created",
    "nvram.write",
    "nvram.rename",
    "nvram.renamed",
];

/// Where a domain's UEFI variable store (libvirt's `<nvram>` file) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvramLocation {
    /// `<nvram_dir>/<name>_VARS.fd`: `dir` is trusted (libvirt's own dir,
    /// re-rootable), `file` built from a validated domain name.
    Default { dir: PathBuf, file: String },
    /// A validated absolute path from the domain XML, walked without
    /// following links from the (re-rooted) root.
    Path { root: PathBuf, path: PathBuf },
}

impl NvramLocation {
    /// libvirt's default path for domain `name`. The name is validated
    /// first: a name that could not be a plain file name never becomes
    /// part of a path.
    pub fn default_for(paths: &Paths, name: &str) -> Result<Self, FsError> {
        let bad = |why| FsError::BadSourcePath {
            path: format!("{}/{name:?}_VARS.fd", paths.nvram_dir().display()),
            why,
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(bad("the domain name is empty, '.' or '..'"));
        }
        if name.contains('/') || name.contains('\0') {
            return Err(bad("the domain name contains '/' or NUL"));
        }
        if name.len() > MAX_NVRAM_NAME {
            return Err(bad("the domain name is too long for a file name"));
        }
        Ok(NvramLocation::Default {
            dir: paths.nvram_dir(),
            file: format!("{name}_VARS.fd"),
        })
    }

    /// An explicit `<nvram>PATH</nvram>` / `<source file=PATH/>`.
    ///
    /// The path must lie below one of `allowed` (libvirt's nvram dir and
    /// the admin's `state_path_prefixes`): without this, `<nvram>/etc/shadow`
    /// would have the hook overwrite (and the post-stop store read) any file.
    pub fn from_path(paths: &Paths, raw: &str, allowed: &[PathBuf]) -> Result<Self, FsError> {
        Ok(NvramLocation::Path {
            root: paths.root().to_path_buf(),
            path: confined(raw, allowed)?,
        })
    }

    /// The file's full path, for messages.
    pub fn path(&self) -> PathBuf {
        match self {
            NvramLocation::Default { dir, file } => dir.join(file),
            NvramLocation::Path { root, path } => root.join(path),
        }
    }

    fn file_name(&self) -> String {
        match self {
            NvramLocation::Default { file, .. } => file.clone(),
            NvramLocation::Path { path, .. } => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Opens the directory that holds the file; `Ok(None)`: it does not
    /// exist. `create` makes libvirt's default dir (0755, owned by `owner`,
    /// as libvirt does) when missing; an explicit path's dir is never created.
    fn open_dir(&self, create: Option<Owner>) -> Result<Option<(OwnedFd, PathBuf)>, FsError> {
        match self {
            NvramLocation::Default { dir, .. } => {
                if let Some(owner) = create {
                    if std::fs::symlink_metadata(dir).is_err() {
                        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
                        let fd = open_trusted_dir(dir)?;
                        set_owner_mode(&fd, owner, 0o755, dir)?;
                    }
                }
                match open_trusted_dir(dir) {
                    Ok(fd) => Ok(Some((fd, dir.clone()))),
                    Err(FsError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            NvramLocation::Path { root, path } => {
                walk_nofollow(root, path.parent().unwrap_or(Path::new("")))
            }
        }
    }

    /// Reads the VARS file: `None` when it (or its dir) does not exist.
    /// Refuses a symlink, a hard link and anything but a regular file.
    pub fn read(&self, max: u64) -> Result<Option<Vec<u8>>, FsError> {
        let Some((dir, dir_path)) = self.open_dir(None)? else {
            return Ok(None);
        };
        let name = self.file_name();
        read_regular_file(dir.as_fd(), &name, &dir_path.join(&name), max)
    }

    /// Refuses early (before anything is written) when the file's dir is
    /// reached through a link, or the file is a symlink, a hard link or not
    /// a regular file.
    pub fn check_safe(&self) -> Result<(), FsError> {
        if let Some((dir, dir_path)) = self.open_dir(None)? {
            let name = self.file_name();
            match statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                    return Err(FsError::Unsafe {
                        path: dir_path.join(&name),
                        what: "a symlink or not a regular file",
                    })
                }
                Ok(st) if st.st_nlink != 1 => {
                    return Err(FsError::Unsafe {
                        path: dir_path.join(&name),
                        what: "a hard link (more than one name)",
                    })
                }
                Ok(_) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io_err("stat", &dir_path.join(&name), e)),
            }
        }
        Ok(())
    }

    /// Temp files of this VARS file: the dir may be shared by all domains,
    /// so the prefix names the file (hashed: a long name plus a suffix would
    /// not fit in one path component).
    fn temp_prefix(&self) -> String {
        format!(
            "{NVRAM_TEMP}{}.",
            Sha256Sum::of(self.file_name().as_bytes()).short()
        )
    }

    /// Removes temp files an interrupted earlier write of this VARS file left
    /// behind (call with the domain's lock held). Best effort.
    pub fn remove_leftovers(&self) {
        let Ok(Some((dir, dir_path))) = self.open_dir(None) else {
            return;
        };
        let prefix = self.temp_prefix();
        for name in list_dir(&dir, &dir_path).unwrap_or_default() {
            if name.starts_with(&prefix) {
                let _ = remove_entry_nofollow(&dir, &name);
            }
        }
    }

    /// Replaces the VARS file with `data`, owned by `owner`, mode 0600: a
    /// temp file created `O_EXCL|O_NOFOLLOW` in the same dir (which the
    /// less trusted qemu user may write), `fchown`/`fchmod` on its fd,
    /// fsync, `rename` over the target (a planted symlink is replaced, never
    /// followed), fsync of the dir.
    pub fn replace(&self, data: &[u8], owner: Owner) -> Result<(), FsError> {
        let (dir, dir_path) = self.open_dir(Some(owner))?.ok_or_else(|| FsError::Io {
            action: "open the directory of",
            path: self.path(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        replace_file(
            &dir,
            &dir_path,
            &self.file_name(),
            data,
            (owner, NVRAM_MODE),
            &self.temp_prefix(),
            NVRAM_FAULT_POINTS,
        )
    }
}

/// Replaces the file `name` in `dir` with `data`, owned by `owner` with
/// `mode`: a temp file created `O_EXCL|O_NOFOLLOW` in the same dir (which a
/// less trusted user may write), `fchown`/`fchmod` on its fd, fsync,
/// `rename` over the target (a planted symlink is replaced, never
/// followed), fsync of the dir. Readers see the old file or the new one.
fn replace_file(
    dir: &OwnedFd,
    dir_path: &Path,
    name: &str,
    data: &[u8],
    (owner, mode): (Owner, u32),
    temp_prefix: &str,
    points: [&'static str; 4],
) -> Result<(), FsError> {
    // Fault points (test builds only) after create, before write, before
    // rename, after rename.
    let point = |i: usize| fault::point(points[i]);
    let target = dir_path.join(name);
    let temp = format!("{temp_prefix}{}", unique_suffix());
    let temp_path = dir_path.join(&temp);
    let fd = openat(
        dir,
        temp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| io_err("create", &temp_path, e))?;
    let result = (|| {
        point(0).map_err(|e| io_err("create", &temp_path, e))?;
        set_owner_mode(&fd, owner, mode, &temp_path)?;
        let mut f = File::from(fd);
        point(1).map_err(|e| io_err("write", &temp_path, e))?;
        f.write_all(data)
            .map_err(|e| io_err("write", &temp_path, e))?;
        f.sync_all().map_err(|e| io_err("fsync", &temp_path, e))?;
        point(2).map_err(|e| io_err("rename into place", &target, e))?;
        renameat_with(dir, temp.as_str(), dir, name, RenameFlags::empty())
            .map_err(|e| io_err("rename into place", &target, e))?;
        let _ = point(3);
        fsync(dir).map_err(|e| io_err("fsync", dir_path, e))
    })();
    if result.is_err() {
        let _ = unlinkat(dir, temp.as_str(), AtFlags::empty());
    }
    result
}

/// Whether `name` below `dir` exists as a regular, singly-linked file
/// (refuses a symlink, a hard link or anything else in its place).
fn check_regular_file(dir: &OwnedFd, name: &str, shown: &Path) -> Result<bool, FsError> {
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
            Err(FsError::Unsafe {
                path: shown.to_path_buf(),
                what: "a symlink or not a regular file",
            })
        }
        Ok(st) if st.st_nlink != 1 => Err(FsError::Unsafe {
            path: shown.to_path_buf(),
            what: "a hard link (more than one name)",
        }),
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(io_err("stat", shown, e)),
    }
}

/// Reads the permall out of a swtpm linear state file. The file holds up
/// to three states, each padded to a power of two: it may be up to about
/// six times the per-state cap.
fn read_linear_file(
    parent: &OwnedFd,
    leaf: &str,
    shown: &Path,
    version: TpmVersion,
    max: u64,
) -> Result<Option<TpmState>, FsError> {
    let file_max = max
        .saturating_mul(6)
        .saturating_add(crate::linear::HEADER_LEN as u64);
    let Some(data) = read_regular_file(parent.as_fd(), leaf, shown, file_max)? else {
        return Ok(None);
    };
    // An empty file is one swtpm has not formatted yet (no state).
    if data.is_empty() {
        return Ok(None);
    }
    let permall = crate::linear::permall(&data).map_err(|source| FsError::Linear {
        path: shown.to_path_buf(),
        source,
    })?;
    // An allocated but empty slot 0 holds no state either.
    let Some(permall) = permall.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    if permall.len() as u64 > max {
        return Err(FsError::TooLarge {
            path: shown.to_path_buf(),
            size: permall.len() as u64,
            limit: max,
        });
    }
    Ok(Some(TpmState::new(
        version,
        vec![StateFile {
            name: version.permall_name().to_string(),
            data: permall.to_vec(),
        }],
    )))
}

/// Opens a directory we trust by configuration (following links, as any
/// admin-configured path may), for `*at` calls below it.
pub fn open_trusted_dir(path: &Path) -> Result<OwnedFd, FsError> {
    openat(
        rustix::fs::CWD,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", path, e))
}

/// Opens `name` below `dir` as a directory, never following a link.
/// `Ok(None)` if it does not exist.
fn open_dir_nofollow(
    dir: impl AsFd,
    name: impl rustix::path::Arg,
    shown: &Path,
) -> Result<Option<OwnedFd>, FsError> {
    match openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP) | Err(Errno::NOTDIR) => Err(FsError::Unsafe {
            path: shown.to_path_buf(),
            what: "a symlink or not a directory",
        }),
        Err(e) => Err(io_err("open", shown, e)),
    }
}

/// Reads one regular, singly-linked file below `dir`, at most `max` bytes.
/// `Ok(None)` if it does not exist.
fn read_regular_file(
    dir: BorrowedFd<'_>,
    name: &str,
    shown: &Path,
    max: u64,
) -> Result<Option<Vec<u8>>, FsError> {
    let fd = match openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(FsError::Unsafe {
                path: shown.to_path_buf(),
                what: "a symlink",
            })
        }
        Err(e) => return Err(io_err("open", shown, e)),
    };
    let st = fstat(&fd).map_err(|e| io_err("stat", shown, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(FsError::Unsafe {
            path: shown.to_path_buf(),
            what: "not a regular file",
        });
    }
    if st.st_nlink != 1 {
        return Err(FsError::Unsafe {
            path: shown.to_path_buf(),
            what: "a hard link (more than one name)",
        });
    }
    let size = st.st_size as u64;
    if size > max {
        return Err(FsError::TooLarge {
            path: shown.to_path_buf(),
            size,
            limit: max,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    File::from(fd)
        .take(max.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| io_err("read", shown, e))?;
    if data.len() as u64 > max {
        return Err(FsError::TooLarge {
            path: shown.to_path_buf(),
            size: data.len() as u64,
            limit: max,
        });
    }
    Ok(Some(data))
}

fn read_state_dir(
    parent: &OwnedFd,
    leaf: &str,
    dir_path: &Path,
    version: TpmVersion,
    max: u64,
) -> Result<Option<TpmState>, FsError> {
    let Some(dir) = open_dir_nofollow(parent, leaf, dir_path)? else {
        return Ok(None);
    };
    let name = version.permall_name();
    match read_regular_file(dir.as_fd(), name, &dir_path.join(name), max)? {
        Some(data) => Ok(Some(TpmState::new(
            version,
            vec![StateFile {
                name: name.to_string(),
                data,
            }],
        ))),
        None => Ok(None),
    }
}

/// The leaf of a kept copy or backup: the TPM's state subdir (the VARS
/// file, if any, beside the permall in the same dir, so that one rename
/// swaps both), or `nvram` for a state without a TPM.
fn machine_leaf(tpm: Option<TpmVersion>) -> &'static str {
    tpm.map_or("nvram", TpmVersion::state_subdir)
}

/// Every file of a machine state, flat: what a kept copy or backup holds.
fn machine_files(state: &MachineState) -> Vec<StateFile> {
    state
        .sections()
        .into_iter()
        .map(|(_, f)| f.clone())
        .collect()
}

/// Reads a kept copy or backup dir: the permall when a TPM is expected
/// (required), `VARS.fd` when `nvram` (optional beside a TPM, required
/// without one).
fn read_machine_dir(
    parent: &OwnedFd,
    leaf: &str,
    dir_path: &Path,
    tpm: Option<TpmVersion>,
    nvram: bool,
    max: u64,
) -> Result<Option<MachineState>, FsError> {
    let Some(dir) = open_dir_nofollow(parent, leaf, dir_path)? else {
        return Ok(None);
    };
    let tpm_state = match tpm {
        Some(version) => {
            let name = version.permall_name();
            match read_regular_file(dir.as_fd(), name, &dir_path.join(name), max)? {
                Some(data) => Some(TpmState::new(
                    version,
                    vec![StateFile {
                        name: name.to_string(),
                        data,
                    }],
                )),
                None => return Ok(None),
            }
        }
        None => None,
    };
    let vars = if nvram {
        read_regular_file(dir.as_fd(), NVRAM_FILE, &dir_path.join(NVRAM_FILE), max)?
    } else {
        None
    };
    let state = MachineState::new(tpm_state, vars);
    Ok((!state.is_empty()).then_some(state))
}

/// A name unique to this process and moment, for temp entries.
fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}.{nanos:09}", std::process::id())
}

/// Builds `leaf` aside with exactly `files` and swaps it into place.
fn replace_dir(
    parent: &OwnedFd,
    parent_path: &Path,
    leaf: &str,
    files: &[StateFile],
    owner: Owner,
) -> Result<(), FsError> {
    let target = parent_path.join(leaf);
    // Refuse a link or non-directory at the target before writing anything.
    match statat(parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
            return Err(FsError::Unsafe {
                path: target,
                what: "a symlink or not a directory",
            })
        }
        Ok(_) | Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err("stat", &target, e)),
    }
    remove_stale_temps(parent, parent_path, leaf);

    let temp = format!(".{leaf}{TEMP_MARK}{}", unique_suffix());
    let temp_path = parent_path.join(&temp);
    mkdirat(parent, temp.as_str(), Mode::from_raw_mode(DIR_MODE))
        .map_err(|e| io_err("create", &temp_path, e))?;
    let built = fault::point("dir.created")
        .map_err(|e| io_err("create", &temp_path, e))
        .and_then(|()| fill_dir(parent, &temp, &temp_path, files, owner))
        .and_then(|()| fault::point("dir.filled").map_err(|e| io_err("fsync", &temp_path, e)));
    if let Err(e) = built {
        let _ = remove_dir_nofollow(parent, &temp, 0);
        return Err(e);
    }
    let swapped = match fault::point("dir.rename") {
        Err(e) => Err(Errno::from_io_error(&e).unwrap_or(Errno::IO)),
        Ok(()) => {
            match renameat_with(parent, temp.as_str(), parent, leaf, RenameFlags::NOREPLACE) {
                Ok(()) => Ok(false),
                Err(Errno::EXIST) => {
                    renameat_with(parent, temp.as_str(), parent, leaf, RenameFlags::EXCHANGE)
                        .map(|()| true)
                }
                Err(e) => Err(e),
            }
        }
    };
    if swapped.is_ok() {
        // Swapped in; a kill here leaves the old dir at the temp name.
        let _ = fault::point("dir.swapped");
    }
    match swapped {
        Ok(true) => {
            // The old state dir now sits at the temp name: rename it out of
            // the way first, so a crash here leaves a recognisable leftover.
            let old = format!(".{leaf}{OLD_MARK}{}", unique_suffix());
            if renameat_with(
                parent,
                temp.as_str(),
                parent,
                old.as_str(),
                RenameFlags::NOREPLACE,
            )
            .is_ok()
            {
                let _ = remove_dir_nofollow(parent, &old, 0);
            } else {
                let _ = remove_dir_nofollow(parent, &temp, 0);
            }
            let _ = fault::point("dir.old_removed");
        }
        Ok(false) => {}
        Err(e) => {
            let _ = remove_dir_nofollow(parent, &temp, 0);
            return Err(io_err("rename into place", &target, e));
        }
    }
    fsync(parent).map_err(|e| io_err("fsync", parent_path, e))?;
    Ok(())
}

fn fill_dir(
    parent: &OwnedFd,
    temp: &str,
    temp_path: &Path,
    files: &[StateFile],
    owner: Owner,
) -> Result<(), FsError> {
    let dir = open_dir_nofollow(parent, temp, temp_path)?.ok_or_else(|| {
        io_err(
            "open",
            temp_path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    for f in files {
        let path = temp_path.join(&f.name);
        let fd = openat(
            &dir,
            f.name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| io_err("create", &path, e))?;
        set_owner_mode(&fd, owner, FILE_MODE, &path)?;
        let mut file = File::from(fd);
        fault::point("dir.write").map_err(|e| io_err("write", &path, e))?;
        file.write_all(&f.data)
            .map_err(|e| io_err("write", &path, e))?;
        file.sync_all().map_err(|e| io_err("fsync", &path, e))?;
    }
    set_owner_mode(&dir, owner, DIR_MODE, temp_path)?;
    fsync(&dir).map_err(|e| io_err("fsync", temp_path, e))?;
    Ok(())
}

fn set_owner_mode(fd: &OwnedFd, owner: Owner, mode: u32, path: &Path) -> Result<(), FsError> {
    let st = fstat(fd).map_err(|e| io_err("stat", path, e))?;
    if st.st_uid != owner.uid || st.st_gid != owner.gid {
        fchown(
            fd,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )
        .map_err(|e| io_err("chown", path, e))?;
    }
    fchmod(fd, Mode::from_raw_mode(mode)).map_err(|e| io_err("chmod", path, e))
}

/// Removes leftovers of an interrupted earlier run (`.<leaf>.vts-new.*`,
/// `.<leaf>.vts-old.*`). Best effort: they never affect libvirt.
fn remove_stale_temps(parent: &OwnedFd, parent_path: &Path, leaf: &str) {
    let Ok(names) = list_dir(parent, parent_path) else {
        return;
    };
    let new_prefix = format!(".{leaf}{TEMP_MARK}");
    let old_prefix = format!(".{leaf}{OLD_MARK}");
    for name in names {
        if name.starts_with(&new_prefix) || name.starts_with(&old_prefix) {
            let _ = remove_entry_nofollow(parent, &name);
        }
    }
}

/// Removes one entry below `parent` (a file, a link or a whole directory),
/// never following a link.
fn remove_entry_nofollow(parent: &OwnedFd, name: &str) -> Result<(), FsError> {
    match unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => remove_dir_nofollow(parent, name, 0),
        Err(e) => Err(io_err("remove", Path::new(name), e)),
    }
}

fn list_dir(dir: &OwnedFd, shown: &Path) -> Result<Vec<String>, FsError> {
    let mut out = Vec::new();
    let d = Dir::read_from(dir).map_err(|e| io_err("list", shown, e))?;
    for entry in d {
        let entry = entry.map_err(|e| io_err("list", shown, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// Removes the directory `name` below `parent` and what is in it, never
/// following a link (links are removed, not their targets).
fn remove_dir_nofollow(parent: &OwnedFd, name: &str, depth: usize) -> Result<(), FsError> {
    let shown = PathBuf::from(name);
    if depth > 8 {
        return Err(FsError::Unsafe {
            path: shown,
            what: "nested too deeply to remove",
        });
    }
    if let Some(dir) = open_dir_nofollow(parent, name, &shown)? {
        for entry in list_dir(&dir, &shown)? {
            match unlinkat(&dir, entry.as_str(), AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::ISDIR) | Err(Errno::PERM) => {
                    remove_dir_nofollow(&dir, &entry, depth + 1)?
                }
                Err(e) => return Err(io_err("remove", &shown.join(&entry), e)),
            }
        }
    }
    match unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(io_err("remove", &shown, e)),
    }
}

// ------------------------------------------------------- our own data

/// Our private files for one host: copies kept at stop, backups, the sync
/// journal (`J`), markers and locks. All root-only.
#[derive(Debug, Clone)]
pub struct HostData {
    data_dir: PathBuf,
    run_dir: PathBuf,
}

/// Facts about one backup on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
}

impl HostData {
    pub fn new(paths: &Paths) -> Self {
        HostData {
            data_dir: paths.data_dir(),
            run_dir: paths.run_dir(),
        }
    }

    /// `<base>/<section>/<uuid>` for our own data: base and section are ours
    /// (created 0700 as needed), the uuid dir is opened without following links.
    fn uuid_dir(
        &self,
        base: &Path,
        section: &str,
        uuid: &DomainUuid,
        create: bool,
    ) -> Result<Option<(OwnedFd, PathBuf)>, FsError> {
        let section_path = base.join(section);
        if create {
            create_private_dir_all(&section_path)?;
        }
        let fd = match open_trusted_dir(&section_path) {
            Ok(fd) => fd,
            Err(FsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && !create =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let path = section_path.join(uuid.as_str());
        if create {
            match mkdirat(&fd, uuid.as_str(), Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_err("create", &path, e)),
            }
        }
        Ok(open_dir_nofollow(&fd, uuid.as_str(), &path)?.map(|d| (d, path)))
    }

    /// The copy of the final local state kept at `stopped end`.
    pub fn read_kept(
        &self,
        uuid: &DomainUuid,
        version: TpmVersion,
        max: u64,
    ) -> Result<Option<TpmState>, FsError> {
        let Some((dir, path)) = self.uuid_dir(&self.data_dir, "kept", uuid, false)? else {
            return Ok(None);
        };
        let leaf = version.state_subdir();
        read_state_dir(&dir, leaf, &path.join(leaf), version, max)
    }

    /// The kept copy as a machine state: the TPM part (when `tpm`) and
    /// the VARS file (when `nvram`), from one directory.
    pub fn read_kept_state(
        &self,
        uuid: &DomainUuid,
        tpm: Option<TpmVersion>,
        nvram: bool,
        max: u64,
    ) -> Result<Option<MachineState>, FsError> {
        let Some((dir, path)) = self.uuid_dir(&self.data_dir, "kept", uuid, false)? else {
            return Ok(None);
        };
        let leaf = machine_leaf(tpm);
        read_machine_dir(&dir, leaf, &path.join(leaf), tpm, nvram, max)
    }

    /// Replaces the kept copy with `state`: its TPM file(s) and VARS file
    /// in one directory, swapped in with one rename.
    pub fn write_kept(&self, uuid: &DomainUuid, state: &MachineState) -> Result<(), FsError> {
        let (dir, path) = self
            .uuid_dir(&self.data_dir, "kept", uuid, true)?
            .expect("created");
        replace_dir(
            &dir,
            &path,
            machine_leaf(state.tpm.as_ref().map(|t| t.version)),
            &machine_files(state),
            Owner::current(),
        )
    }

    /// Saves `state` under `backups/<uuid>/<time>-<digest>/` and keeps only
    /// the newest `keep` backups of that domain.
    pub fn backup(
        &self,
        uuid: &DomainUuid,
        state: &MachineState,
        keep: usize,
    ) -> Result<PathBuf, FsError> {
        let (dir, path) = self
            .uuid_dir(&self.data_dir, "backups", uuid, true)?
            .expect("created");
        // Nanoseconds, so that names sort by age even within one second
        // (pruning below keeps the last names in sort order).
        let stamp = humantime::format_rfc3339_nanos(SystemTime::now())
            .to_string()
            .replace([':', '-'], "");
        let name = format!(
            "{stamp}-{}-{}",
            state.digest().short(),
            machine_leaf(state.tpm.as_ref().map(|t| t.version))
        );
        let full = path.join(&name);
        if !full.exists() {
            replace_dir(&dir, &path, &name, &machine_files(state), Owner::current())?;
        }
        let mut names: Vec<String> = list_dir(&dir, &path)?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(keep.max(1));
        for old in &names[..excess] {
            remove_dir_nofollow(&dir, old, 0)?;
        }
        Ok(full)
    }

    /// Backups of one domain, oldest first.
    pub fn list_backups(&self, uuid: &DomainUuid) -> Result<Vec<PathBuf>, FsError> {
        let Some((dir, path)) = self.uuid_dir(&self.data_dir, "backups", uuid, false)? else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = list_dir(&dir, &path)?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names.into_iter().map(|n| path.join(n)).collect())
    }

    /// Removes what interrupted earlier runs left in this domain's own data
    /// (temp and old dirs of kept copies and backups, temp files of `J`).
    /// Call with the domain's lock held: every writer of these holds it.
    /// Best effort.
    pub fn remove_leftovers(&self, uuid: &DomainUuid) {
        let ours = |name: &str| {
            name.starts_with('.') && (name.contains(TEMP_MARK) || name.contains(OLD_MARK))
        };
        for section in ["kept", "backups"] {
            if let Ok(Some((dir, path))) = self.uuid_dir(&self.data_dir, section, uuid, false) {
                for name in list_dir(&dir, &path).unwrap_or_default() {
                    if ours(&name) {
                        let _ = remove_entry_nofollow(&dir, &name);
                    }
                }
            }
        }
        let synced = self.data_dir.join("synced");
        if let Ok(dir) = open_trusted_dir(&synced) {
            let prefix = format!(".{uuid}{TEMP_MARK}");
            for name in list_dir(&dir, &synced).unwrap_or_default() {
                if name.starts_with(&prefix) {
                    let _ = remove_entry_nofollow(&dir, &name);
                }
            }
        }
    }

    /// `J`: the digest this host last synced with the metadata for `uuid`.
    pub fn read_synced(&self, uuid: &DomainUuid) -> Result<Option<Sha256Sum>, FsError> {
        let dir_path = self.data_dir.join("synced");
        let dir = match open_trusted_dir(&dir_path) {
            Ok(d) => d,
            Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let path = dir_path.join(uuid.as_str());
        Ok(read_regular_file(dir.as_fd(), uuid.as_str(), &path, 256)?
            .and_then(|b| Sha256Sum::parse_hex(String::from_utf8_lossy(&b).trim())))
    }

    /// Records that this host's local state and the metadata agree on
    /// `state` (the decision rule's `J`). The kept copy is brought up to the
    /// same state first: a kept copy older than `J` would otherwise look
    /// "newer than the metadata" once libvirt deletes the live dir.
    pub fn record_sync(&self, uuid: &DomainUuid, state: &MachineState) -> Result<(), FsError> {
        let kept = self.read_kept_state(
            uuid,
            state.tpm.as_ref().map(|t| t.version),
            state.nvram.is_some(),
            KEPT_READ_LIMIT,
        )?;
        if kept.as_ref().map(MachineState::digest) != Some(state.digest()) {
            self.write_kept(uuid, state)?;
            fault::point("sync.kept").map_err(|e| io_err("write", &self.data_dir, e))?;
        }
        // Already recorded: write nothing (an unchanged store stays a read).
        if self.read_synced(uuid)? == Some(state.digest()) {
            return Ok(());
        }
        let dir_path = self.data_dir.join("synced");
        create_private_dir_all(&dir_path)?;
        write_file_atomically(
            &dir_path,
            uuid.as_str(),
            format!("{}\n", state.digest()).as_bytes(),
        )
    }

    /// Marks that the next `prepare` of `uuid` is an incoming migration or a
    /// restore from a save image, and must not restore.
    pub fn set_incoming(&self, uuid: &DomainUuid, op: &str) -> Result<(), FsError> {
        let dir_path = self.run_dir.join("incoming");
        create_private_dir_all(&dir_path)?;
        write_file_atomically(&dir_path, uuid.as_str(), format!("{op}\n").as_bytes())
    }

    /// Whether a fresh (younger than [`MARKER_TTL`]) incoming marker exists.
    pub fn incoming(&self, uuid: &DomainUuid) -> Result<bool, FsError> {
        let path = self.run_dir.join("incoming").join(uuid.as_str());
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => {
                let age = m
                    .modified()
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or(Duration::ZERO);
                Ok(age < MARKER_TTL)
            }
            Ok(_) => Err(FsError::Unsafe {
                path,
                what: "not a regular file",
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &path, e)),
        }
    }

    /// Whether any incoming marker exists at all (cheap: one directory read).
    pub fn any_incoming(&self) -> bool {
        std::fs::read_dir(self.run_dir.join("incoming"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    pub fn clear_incoming(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        let path = self.run_dir.join("incoming").join(uuid.as_str());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path, e)),
        }
    }

    /// Takes the per-domain lock that serialises hook, `store` and `restore`,
    /// waiting at most `timeout`.
    pub fn lock(&self, uuid: &DomainUuid, timeout: Duration) -> Result<DomainLock, FsError> {
        let dir_path = self.run_dir.join("locks");
        create_private_dir_all(&dir_path)?;
        let dir = open_trusted_dir(&dir_path)?;
        let name = format!("{uuid}.lock");
        let path = dir_path.join(&name);
        let fd = openat(
            &dir,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| match e {
            Errno::LOOP => FsError::Unsafe {
                path: path.clone(),
                what: "a symlink",
            },
            e => io_err("open", &path, e),
        })?;
        let start = Instant::now();
        loop {
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DomainLock { _fd: fd }),
                Err(Errno::WOULDBLOCK) | Err(Errno::INTR) => {
                    if start.elapsed() >= timeout {
                        return Err(FsError::LockTimeout {
                            uuid: uuid.clone(),
                            secs: timeout.as_secs(),
                            lock: path,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => return Err(io_err("lock", &path, e)),
            }
        }
    }
}

/// Held while working on one domain; released on drop (or process exit).
#[derive(Debug)]
pub struct DomainLock {
    _fd: OwnedFd,
}

/// Creates our own directory (and parents) with mode 0700.
pub fn create_private_dir_all(path: &Path) -> Result<(), FsError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| io_err("create", path, e))
}

/// Writes `name` in `dir_path` atomically: a temp file (0600, `O_EXCL`),
/// fsync, rename over, fsync of the directory.
pub fn write_file_atomically(dir_path: &Path, name: &str, data: &[u8]) -> Result<(), FsError> {
    write_file_atomically_mode(dir_path, name, data, FILE_MODE)
}

pub fn write_file_atomically_mode(
    dir_path: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), FsError> {
    let dir = open_trusted_dir(dir_path)?;
    let temp = format!(".{name}{TEMP_MARK}{}", unique_suffix());
    let temp_path = dir_path.join(&temp);
    let fd = openat(
        &dir,
        temp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| io_err("create", &temp_path, e))?;
    let result = (|| {
        fault::point("file.created").map_err(|e| io_err("create", &temp_path, e))?;
        fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| io_err("chmod", &temp_path, e))?;
        let mut f = File::from(fd);
        fault::point("file.write").map_err(|e| io_err("write", &temp_path, e))?;
        f.write_all(data)
            .map_err(|e| io_err("write", &temp_path, e))?;
        f.sync_all().map_err(|e| io_err("fsync", &temp_path, e))?;
        fault::point("file.rename")
            .map_err(|e| io_err("rename into place", &dir_path.join(name), e))?;
        renameat_with(&dir, temp.as_str(), &dir, name, RenameFlags::empty())
            .map_err(|e| io_err("rename into place", &dir_path.join(name), e))?;
        let _ = fault::point("file.renamed");
        fsync(&dir).map_err(|e| io_err("fsync", dir_path, e))
    })();
    if result.is_err() {
        let _ = unlinkat(&dir, temp.as_str(), AtFlags::empty());
    }
    result
}

/// Creates `name` in the directory `dir_path` (which must not be a link) with
/// mode 0600, refusing to overwrite anything or follow a link.
pub fn write_new_file(dir_path: &Path, name: &str, data: &[u8]) -> Result<(), FsError> {
    let dir = openat(
        rustix::fs::CWD,
        dir_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP | Errno::NOTDIR => FsError::Unsafe {
            path: dir_path.to_path_buf(),
            what: "a symlink or not a directory",
        },
        e => io_err("open", dir_path, e),
    })?;
    let path = dir_path.join(name);
    let fd = openat(
        &dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )
    .map_err(|e| io_err("create (it must not exist yet)", &path, e))?;
    let mut f = File::from(fd);
    f.write_all(data).map_err(|e| io_err("write", &path, e))?;
    f.sync_all().map_err(|e| io_err("fsync", &path, e))
}

// ------------------------------------------------------------ host keys

/// `<config>/keys`: root-only host keys, one per file.
pub fn keys_dir(paths: &Paths) -> PathBuf {
    paths.config_dir().join("keys")
}

/// Loads every `*.key` in the keys dir, oldest first (file names start with
/// their creation time, so the newest sorts last). Refuses key files that
/// are links, not regular, readable by group or others, or malformed — with
/// the path, never the content.
pub fn load_keyring(paths: &Paths) -> Result<Keyring, FsError> {
    let dir_path = keys_dir(paths);
    let dir = match open_trusted_dir(&dir_path) {
        Ok(d) => d,
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Keyring::default())
        }
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = list_dir(&dir, &dir_path)?
        .into_iter()
        .filter(|n| n.ends_with(".key") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    for name in names {
        let path = dir_path.join(&name);
        let st = statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("stat", &path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FsError::Unsafe {
                path,
                what: "a key file that is a symlink or not a regular file",
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != 0 && st.st_uid != me {
            return Err(FsError::Unsafe {
                path,
                what: "a key file owned by another user (chown root it)",
            });
        }
        if st.st_mode & 0o077 != 0 {
            return Err(FsError::Unsafe {
                path,
                what: "a key file readable or writable by group or others (chmod 600 it)",
            });
        }
        let text = read_regular_file(dir.as_fd(), &name, &path, 256)?.unwrap_or_default();
        let key = parse_key_file(&text).ok_or(FsError::Unsafe {
            path,
            what: "not a virt-tpm-state key (one line of base64, 32 bytes)",
        })?;
        keys.push(key);
    }
    Ok(Keyring::new(keys))
}

fn parse_key_file(text: &[u8]) -> Option<SecretKey> {
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(std::str::from_utf8(text).ok()?.trim())
        .ok()?;
    let key = <[u8; KEY_LEN]>::try_from(raw.as_slice())
        .ok()
        .map(SecretKey::from_bytes);
    zeroize::Zeroize::zeroize(&mut raw);
    key
}

/// Creates a new host key file (0600, `O_EXCL`: never overwrites) and
/// returns its id and path.
pub fn create_key(paths: &Paths, key: &SecretKey) -> Result<(KeyId, PathBuf), FsError> {
    use base64::Engine as _;
    let dir_path = keys_dir(paths);
    create_private_dir_all(&dir_path)?;
    let id = key.id();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let name = format!("{stamp}-{id}.key");
    let mut text = base64::engine::general_purpose::STANDARD.encode(key.expose());
    text.push('\n');
    let result = write_new_file(&dir_path, &name, text.as_bytes());
    zeroize::Zeroize::zeroize(&mut text);
    result?;
    Ok((id, dir_path.join(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_values() {
        let conf =
            "# swtpm_user = \"nobody\"\nswtpm_user = \"tss\" # comment\nswtpm_group=\"+0\"\n";
        assert_eq!(conf_value(conf, "swtpm_user").as_deref(), Some("tss"));
        assert_eq!(conf_value(conf, "swtpm_group").as_deref(), Some("+0"));
        assert_eq!(conf_value(conf, "user"), None);
        assert_eq!(resolve_group("+0").unwrap(), 0);
    }

    #[test]
    fn source_paths_are_validated() {
        let p = Paths::with_root("/r");
        let allowed = [PathBuf::from("/srv/tpm")];
        assert!(StateLocation::from_source(&p, "/srv/tpm/vm1", &allowed).is_ok());
        for bad in [
            "relative/x",
            "/srv/../etc",
            "/srv/./x",
            "/",
            "",
            "/etc",
            "/srv/tpm",
            "/srv/tpmx/vm1",
            "/srv/tpm/../../etc",
            // Leaves that could collide with another domain's temp names.
            "/srv/tpm/.vm1",
            "/srv/tpm/vm1.vts-new.1",
            "/srv/tpm/vm1.vts-old.1",
        ] {
            assert!(
                StateLocation::from_source(&p, bad, &allowed).is_err(),
                "{bad}"
            );
            assert!(
                StateLocation::from_source_file(&p, bad, &allowed).is_err(),
                "{bad}"
            );
        }
        let long = format!("/srv/tpm/{}", "x".repeat(201));
        assert!(StateLocation::from_source_file(&p, &long, &allowed).is_err());
        let ok = format!("/srv/tpm/{}", "x".repeat(200));
        assert!(StateLocation::from_source_file(&p, &ok, &allowed).is_ok());
        assert!(StateLocation::from_source(&p, "/srv/tpm/vm1", &[]).is_err());
        assert_eq!(
            StateLocation::from_source(&p, "/srv/tpm/vm1", &allowed)
                .unwrap()
                .path(),
            PathBuf::from("/r/srv/tpm/vm1")
        );
    }
}
