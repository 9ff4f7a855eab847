//! Where libvirt keeps a domain's state: the swtpm state dir (or state
//! file) and the UEFI variable store. Each is reached from its anchor:
//! libvirt's own dir, or the admin's `state_path_prefixes` entry that a
//! path from the domain XML lies below.

use super::dir::{Dir, FILE_MODE, OLD_MARK, TEMP_MARK};
use super::error::{io_err, FsError};
use super::owner::Owner;
use super::Anchor;
use crate::paths::Paths;
use crate::state::{DomainUuid, Sha256Sum, StateFile, TpmState, TpmVersion, VarsKind};
use nix::errno::Errno;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

/// libvirt creates `/var/lib/libvirt/swtpm` and `<base>/<uuid>` as 0711 root.
const SWTPM_DIR_MODE: u32 = 0o711;

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

/// A path from the domain XML, split at the admin-allowed directory it lies
/// below: that directory is the anchor, the rest is walked without links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Confined {
    paths: Paths,
    /// The allowed directory (absolute, not re-rooted).
    anchor: PathBuf,
    /// The path below it (at least one component).
    rel: PathBuf,
}

impl Confined {
    fn shown(&self) -> PathBuf {
        self.paths.under_root(&self.anchor).join(&self.rel)
    }

    fn leaf(&self) -> String {
        self.rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The directory holding the leaf. `Ok(None)`: it does not exist.
    fn open_parent(&self) -> Result<Option<Dir>, FsError> {
        let Some(anchor) = Anchor::Other(self.anchor.clone()).open(&self.paths)? else {
            return Ok(None);
        };
        anchor.open_beneath(self.rel.parent().unwrap_or(Path::new("")))
    }
}

/// Where libvirt keeps a domain's swtpm state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateLocation {
    /// `<base>/<uuid>/<tpm2|tpm1.2>` below libvirt's swtpm base.
    Default {
        paths: Paths,
        uuid: DomainUuid,
        version: TpmVersion,
    },
    /// `<source type='dir' path=...>`.
    Source(Confined),
    /// `<source type='file' path=...>` (libvirt >= 10.10): one file in
    /// swtpm's linear layout ([`crate::linear`]) instead of a dir; its slot 0
    /// is the same permall the dir backend keeps in `tpm2-00.permall`.
    File(Confined),
}

impl StateLocation {
    pub(crate) fn default_for(paths: &Paths, uuid: &DomainUuid, version: TpmVersion) -> Self {
        StateLocation::Default {
            paths: paths.clone(),
            uuid: uuid.clone(),
            version,
        }
    }

    /// Validates a `<source type='dir' path=...>` before it goes near the
    /// filesystem: absolute, normal components only, below one of
    /// `allowed` (absolute, not re-rooted). The XML is hostile: without this
    /// a `<source path='/etc'>` would have the hook swap out any directory.
    pub(crate) fn from_source(
        paths: &Paths,
        raw: &str,
        allowed: &[PathBuf],
    ) -> Result<Self, FsError> {
        Ok(StateLocation::Source(source_leaf_checked(
            raw,
            confined(paths, raw, allowed)?,
        )?))
    }

    /// Validates a `<source type='file' path=...>` the same way as a dir
    /// source: the file is replaced on restore, so it is confined likewise.
    pub(crate) fn from_source_file(
        paths: &Paths,
        raw: &str,
        allowed: &[PathBuf],
    ) -> Result<Self, FsError> {
        Ok(StateLocation::File(source_leaf_checked(
            raw,
            confined(paths, raw, allowed)?,
        )?))
    }

    /// The state dir's (or state file's) full path, for messages.
    pub(crate) fn path(&self) -> PathBuf {
        match self {
            StateLocation::Default {
                paths,
                uuid,
                version,
            } => paths
                .swtpm_base()
                .join(uuid.as_str())
                .join(version.state_subdir()),
            StateLocation::Source(c) | StateLocation::File(c) => c.shown(),
        }
    }

    /// Where the state file `name` (e.g. the permall) lives, for messages:
    /// inside the state dir, or the one file.
    pub(crate) fn file_path(&self, name: &str) -> PathBuf {
        match self {
            StateLocation::File(_) => self.path(),
            _ => self.path().join(name),
        }
    }

    /// A single state file (`<source type='file'>`) rather than a dir.
    pub(crate) fn is_file(&self) -> bool {
        matches!(self, StateLocation::File(_))
    }

    fn leaf(&self) -> String {
        match self {
            StateLocation::Default { version, .. } => version.state_subdir().to_string(),
            StateLocation::Source(c) | StateLocation::File(c) => c.leaf(),
        }
    }

    /// Opens the directory that holds the state dir (state file). `create`
    /// makes libvirt's swtpm base and `<base>/<uuid>` (0711 root, as libvirt
    /// does) when missing; a `<source>` parent is never created.
    /// `Ok(None)`: it does not exist.
    fn open_parent(&self, create: bool) -> Result<Option<Dir>, FsError> {
        match self {
            StateLocation::Default { paths, uuid, .. } => {
                if create {
                    let base = Anchor::SwtpmBase.open_or_create(paths, SWTPM_DIR_MODE)?;
                    return base.ensure_subdir(uuid.as_str(), SWTPM_DIR_MODE).map(Some);
                }
                match Anchor::SwtpmBase.open(paths)? {
                    Some(base) => base.open_subdir(uuid.as_str()),
                    None => Ok(None),
                }
            }
            StateLocation::Source(c) | StateLocation::File(c) => c.open_parent(),
        }
    }

    /// Reads the state in this location: `None` when the dir or the
    /// permanent-state file is absent (for a state file: absent, empty, or
    /// with no permall yet, as before libvirt's first `swtpm_setup`).
    pub(crate) fn read(&self, version: TpmVersion, max: u64) -> Result<Option<TpmState>, FsError> {
        let Some(parent) = self.open_parent(false)? else {
            return Ok(None);
        };
        if self.is_file() {
            return read_linear_file(&parent, &self.leaf(), version, max);
        }
        let Some(dir) = parent.open_subdir(&self.leaf())? else {
            return Ok(None);
        };
        read_tpm_files(&dir, version, max)
    }

    /// The permanent state's modification time, if it exists.
    pub(crate) fn modified(&self, version: TpmVersion) -> Option<SystemTime> {
        let parent = self.open_parent(false).ok()??;
        if self.is_file() {
            return parent.modified(&self.leaf());
        }
        parent
            .open_subdir(&self.leaf())
            .ok()??
            .modified(version.permall_name())
    }

    /// True when the state dir (state file) exists (even empty).
    pub(crate) fn exists(&self) -> Result<bool, FsError> {
        let Some(parent) = self.open_parent(false)? else {
            return Ok(false);
        };
        if self.is_file() {
            return parent.check_file(&self.leaf());
        }
        Ok(parent.open_subdir(&self.leaf())?.is_some())
    }

    /// Refuses early (before anything is written) when the state dir or its
    /// parents are links or not directories.
    pub(crate) fn check_safe(&self) -> Result<(), FsError> {
        self.exists().map(|_| ())
    }

    /// Removes what an interrupted earlier replace left beside the state dir
    /// or state file (`.<leaf>.vts-new.*`, `.<leaf>.vts-old.*`; call with
    /// the domain's lock held). Failures are logged, never fatal.
    pub(crate) fn remove_leftovers(&self) {
        match self.open_parent(false) {
            Ok(Some(parent)) => parent.remove_leftovers_of(&self.leaf()),
            Ok(None) => {}
            // The write that follows meets the same and reports it.
            Err(e) => log::debug!("{e}"),
        }
    }

    /// Replaces the state dir with exactly `files`, owned by `owner`. A
    /// state file is replaced by a linear file holding only the permall
    /// (`version`'s name among `files`), as swtpm lays out a fresh one.
    pub(crate) fn replace(
        &self,
        version: TpmVersion,
        files: &[StateFile],
        owner: Owner,
    ) -> Result<(), FsError> {
        let parent = self
            .open_parent(true)?
            .ok_or_else(|| io_err("open the directory of", &self.path(), Errno::ENOENT))?;
        if self.is_file() {
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
            return parent.replace_file(
                &self.leaf(),
                &data,
                (owner, FILE_MODE),
                // Named after the file, so remove_leftovers finds it.
                &format!(".{}{TEMP_MARK}", self.leaf()),
                STATE_FILE_FAULT_POINTS,
            );
        }
        parent.replace_dir(&self.leaf(), files, owner)
    }
}

/// The last component of a `<source>` path names our temp and old entries
/// beside it (`.<leaf>.vts-new.*`, `.<leaf>.vts-old.*`), and leftovers are
/// found by that prefix in a dir other domains may share. So the leaf may
/// not look like one of those names (or it could match another domain's
/// prefix), and it must leave room for the suffix within NAME_MAX.
fn source_leaf_checked(raw: &str, c: Confined) -> Result<Confined, FsError> {
    let leaf = c.leaf();
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
        None => Ok(c),
    }
}

/// Validates an absolute path from the domain XML (`<source path>`,
/// `<nvram>`) before it goes near the filesystem: absolute, no NUL, normal
/// components only, strictly below one of `allowed`; the most specific
/// allowed directory becomes its anchor.
fn confined(paths: &Paths, raw: &str, allowed: &[PathBuf]) -> Result<Confined, FsError> {
    let path = validated_abs_path(raw)?;
    let anchor = allowed
        .iter()
        .filter(|prefix| {
            let prefix = prefix.strip_prefix("/").unwrap_or(prefix);
            !prefix.as_os_str().is_empty() && path.starts_with(prefix) && path != prefix
        })
        .max_by_key(|prefix| prefix.components().count());
    let Some(anchor) = anchor else {
        return Err(FsError::BadSourcePath {
            path: raw.to_string(),
            why: "outside the directories virt-tpm-state may write (libvirt's own, or state_path_prefixes in /etc/virt-tpm-state/config.toml)",
        });
    };
    let rel = path
        .strip_prefix(anchor.strip_prefix("/").unwrap_or(anchor))
        .expect("checked above")
        .to_path_buf();
    Ok(Confined {
        paths: paths.clone(),
        anchor: Path::new("/").join(anchor.strip_prefix("/").unwrap_or(anchor)),
        rel,
    })
}

/// `raw` checked and made relative to `/`.
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

/// A swtpm linear state file holds up to three states, each padded to a
/// power of two: it may be up to about six times the per-state cap.
fn linear_file_max(max: u64) -> u64 {
    max.saturating_mul(6)
        .saturating_add(crate::linear::HEADER_LEN as u64)
}

/// Reads the permall out of a swtpm linear state file.
fn read_linear_file(
    parent: &Dir,
    leaf: &str,
    version: TpmVersion,
    max: u64,
) -> Result<Option<TpmState>, FsError> {
    let shown = parent.path().join(leaf);
    let Some(data) = parent.read_file(leaf, linear_file_max(max))? else {
        return Ok(None);
    };
    // An empty file is one swtpm has not formatted yet (no state).
    if data.is_empty() {
        return Ok(None);
    }
    let permall = crate::linear::permall(&data).map_err(|source| FsError::Linear {
        path: shown.clone(),
        source,
    })?;
    // An allocated but empty slot 0 holds no state either.
    let Some(permall) = permall.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    if permall.len() as u64 > max {
        return Err(FsError::TooLarge {
            path: shown,
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

/// The carried files of a state dir (or a kept copy): the permall and, for
/// TPM 2.0, the EK certificates beside it. `None` when the permall is
/// absent. Other files (locks, volatile states, swtpm's `.bak`) are left
/// alone: they are never carried, and never a reason to refuse.
pub(crate) fn read_tpm_files(
    dir: &Dir,
    version: TpmVersion,
    max: u64,
) -> Result<Option<TpmState>, FsError> {
    let name = version.permall_name();
    let Some(data) = dir.read_file(name, max)? else {
        return Ok(None);
    };
    let mut files = vec![StateFile {
        name: name.to_string(),
        data,
    }];
    for cert in version.ek_cert_files() {
        if let Some(data) = dir.read_file(cert, max)? {
            files.push(StateFile {
                name: cert.to_string(),
                data,
            });
        }
    }
    Ok(Some(TpmState::new(version, files)))
}

// ------------------------------------------------------------ UEFI NVRAM

/// Longest domain name that can become `<name>_VARS.fd` (255-byte names).
const MAX_NVRAM_NAME: usize = 255 - "_VARS.fd".len();
/// Mode libvirt gives a VARS file (and our temp file while it is written).
const NVRAM_MODE: u32 = 0o600;
const NVRAM_TEMP: &str = ".vts-nvram-new.";

/// Where a domain's UEFI variable store lives: libvirt's `<nvram>` file
/// (a flash image) or its `<varstore>` file (uefi-vars JSON, libvirt >=
/// 12.1). Both follow the same rules; only the default dir and name differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NvramLocation {
    /// `<nvram_dir>/<name>_VARS.fd` or `<varstore_dir>/<name>.json`, the
    /// file name built from a validated domain name.
    Default {
        paths: Paths,
        file: String,
        kind: VarsKind,
    },
    /// An explicit path from the domain XML, below an allowed directory.
    Path(Confined, VarsKind),
}

impl NvramLocation {
    /// libvirt's default path of a `kind` store for domain `name`. The
    /// name is validated first: a name that could not be a plain file name
    /// never becomes part of a path.
    pub(crate) fn default_for(paths: &Paths, name: &str, kind: VarsKind) -> Result<Self, FsError> {
        let suffix = default_suffix(kind);
        let bad = |why| FsError::BadSourcePath {
            path: format!("{}/{name:?}{suffix}", default_dir(paths, kind).display()),
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
            paths: paths.clone(),
            file: format!("{name}{suffix}"),
            kind,
        })
    }

    /// The kind of store here.
    pub(crate) fn kind(&self) -> VarsKind {
        match self {
            NvramLocation::Default { kind, .. } | NvramLocation::Path(_, kind) => *kind,
        }
    }

    /// An explicit `<nvram>PATH</nvram>` / `<source file=PATH/>`, which must
    /// lie below one of `allowed` (libvirt's nvram dir and the admin's
    /// `state_path_prefixes`): without this, `<nvram>/etc/shadow` would have
    /// the hook overwrite (and the post-stop store read) any file.
    pub(crate) fn from_path(
        paths: &Paths,
        raw: &str,
        allowed: &[PathBuf],
        kind: VarsKind,
    ) -> Result<Self, FsError> {
        Ok(NvramLocation::Path(confined(paths, raw, allowed)?, kind))
    }

    /// The file's full path, for messages.
    pub(crate) fn path(&self) -> PathBuf {
        match self {
            NvramLocation::Default { paths, file, kind } => default_dir(paths, *kind).join(file),
            NvramLocation::Path(c, _) => c.shown(),
        }
    }

    fn file_name(&self) -> String {
        match self {
            NvramLocation::Default { file, .. } => file.clone(),
            NvramLocation::Path(c, _) => c.leaf(),
        }
    }

    /// Opens the directory that holds the file; `Ok(None)`: it does not
    /// exist. Never created: libvirtd creates its nvram dir when it starts.
    fn open_dir(&self) -> Result<Option<Dir>, FsError> {
        match self {
            NvramLocation::Default {
                paths,
                kind: VarsKind::Nvram,
                ..
            } => Anchor::NvramDir.open(paths),
            NvramLocation::Default {
                paths,
                kind: VarsKind::Varstore,
                ..
            } => Anchor::VarstoreDir.open(paths),
            NvramLocation::Path(c, _) => c.open_parent(),
        }
    }

    /// Reads the VARS file: `None` when it (or its dir) does not exist.
    /// Refuses a symlink, a hard link and anything but a regular file.
    pub(crate) fn read(&self, max: u64) -> Result<Option<Vec<u8>>, FsError> {
        match self.open_dir()? {
            Some(dir) => dir.read_file(&self.file_name(), max),
            None => Ok(None),
        }
    }

    /// Refuses early (before anything is written) when the file's dir is
    /// reached through a link, or the file is a symlink, a hard link or not
    /// a regular file.
    pub(crate) fn check_safe(&self) -> Result<(), FsError> {
        if let Some(dir) = self.open_dir()? {
            dir.check_file(&self.file_name())?;
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
    /// behind (call with the domain's lock held). Failures are logged.
    pub(crate) fn remove_leftovers(&self) {
        match self.open_dir() {
            Ok(Some(dir)) => {
                let prefix = self.temp_prefix();
                dir.remove_matching(|n| n.starts_with(&prefix), &self.file_name());
            }
            Ok(None) => {}
            // The write that follows meets the same and reports it.
            Err(e) => log::debug!("{e}"),
        }
    }

    /// Refuses early (before a restore records its intent) when the file's
    /// dir does not exist: the same error [`Self::replace`] would give.
    pub(crate) fn check_dir_exists(&self) -> Result<(), FsError> {
        self.open_dir()?
            .map(|_| ())
            .ok_or_else(|| self.missing_dir())
    }

    fn missing_dir(&self) -> FsError {
        match self {
            NvramLocation::Default { paths, kind, .. } => FsError::NvramDirMissing {
                path: default_dir(paths, *kind),
            },
            NvramLocation::Path(..) => io_err("open the directory of", &self.path(), Errno::ENOENT),
        }
    }

    /// Replaces the VARS file with `data`, owned by `owner`, mode 0600
    /// ([`Dir::replace_file`]: the dir is writable by the QEMU user).
    pub(crate) fn replace(&self, data: &[u8], owner: Owner) -> Result<(), FsError> {
        let dir = self.open_dir()?.ok_or_else(|| self.missing_dir())?;
        dir.replace_file(
            &self.file_name(),
            data,
            (owner, NVRAM_MODE),
            &self.temp_prefix(),
            NVRAM_FAULT_POINTS,
        )
    }
}

/// libvirt's default dir for a `kind` store.
fn default_dir(paths: &Paths, kind: VarsKind) -> PathBuf {
    match kind {
        VarsKind::Nvram => paths.nvram_dir(),
        VarsKind::Varstore => paths.varstore_dir(),
    }
}

/// What libvirt appends to the domain name for its default file
/// (`qemuDomainNVRAMPathFormat`; `<name>.json` for a varstore in 12.x).
fn default_suffix(kind: VarsKind) -> &'static str {
    match kind {
        VarsKind::Nvram => "_VARS.fd",
        VarsKind::Varstore => ".json",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "/srv/tpm//vm1",
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

    #[test]
    fn the_most_specific_allowed_dir_is_the_anchor() {
        let p = Paths::with_root("/");
        let allowed = [PathBuf::from("/srv"), PathBuf::from("/srv/tpm/")];
        let StateLocation::Source(c) =
            StateLocation::from_source(&p, "/srv/tpm/a/vm1", &allowed).unwrap()
        else {
            panic!("a dir source")
        };
        assert_eq!(c.anchor, PathBuf::from("/srv/tpm"));
        assert_eq!(c.rel, PathBuf::from("a/vm1"));
    }
}
