//! Our own data for one host: copies kept at stop, backups, the sync
//! journal (`J`), markers and locks. All root-only, below our anchors
//! (`/var/lib/virt-tpm-state`, `/run/virt-tpm-state`).

use super::dir::{Dir, EntryKind, DIR_MODE, FILE_MODE, OLD_MARK, TEMP_MARK};
use super::error::{io_err, FsError};
use super::locations::read_permall;
use super::owner::Owner;
use super::Anchor;
use crate::fault;
use crate::paths::Paths;
use crate::state::{
    DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, NVRAM_FILE,
};
use rustix::fs::FlockOperation;
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How long a "do not restore" marker from `migrate`/`restore begin` is
/// honoured: the `prepare` it is meant for follows within seconds.
pub const MARKER_TTL: Duration = Duration::from_secs(300);

/// Upper bound for reading our own kept copies (we wrote them, within the
/// configured per-file cap, which cannot exceed this in practice).
const KEPT_READ_LIMIT: u64 = 64 * 1024 * 1024;

const KEPT: &str = "kept";
const BACKUPS: &str = "backups";
const SYNCED: &str = "synced";
const INCOMING: &str = "incoming";
const LOCKS: &str = "locks";

#[derive(Debug, Clone)]
pub struct HostData {
    paths: Paths,
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

impl HostData {
    pub fn new(paths: &Paths) -> Self {
        HostData {
            paths: paths.clone(),
        }
    }

    /// `<anchor>/<section>`, created 0700 when `create`.
    fn section(&self, anchor: Anchor, section: &str, create: bool) -> Result<Option<Dir>, FsError> {
        if create {
            return anchor
                .open_or_create(&self.paths, DIR_MODE)?
                .ensure_subdir(section, DIR_MODE)
                .map(Some);
        }
        match anchor.open(&self.paths)? {
            Some(d) => d.open_subdir(section),
            None => Ok(None),
        }
    }

    /// `<data>/<section>/<uuid>`, created 0700 when `create`.
    fn uuid_dir(
        &self,
        section: &str,
        uuid: &DomainUuid,
        create: bool,
    ) -> Result<Option<Dir>, FsError> {
        match self.section(Anchor::Data, section, create)? {
            Some(d) if create => d.ensure_subdir(uuid.as_str(), DIR_MODE).map(Some),
            Some(d) => d.open_subdir(uuid.as_str()),
            None => Ok(None),
        }
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
        let Some(dir) = self.uuid_dir(KEPT, uuid, false)? else {
            return Ok(None);
        };
        let Some(dir) = dir.open_subdir(machine_leaf(tpm))? else {
            return Ok(None);
        };
        let tpm_state: Option<TpmState> = match tpm {
            Some(version) => match read_permall(&dir, version, max)? {
                Some(t) => Some(t),
                None => return Ok(None),
            },
            None => None,
        };
        let vars = if nvram {
            dir.read_file(NVRAM_FILE, max)?
        } else {
            None
        };
        let state = MachineState::new(tpm_state, vars);
        Ok((!state.is_empty()).then_some(state))
    }

    /// Replaces the kept copy with `state`: its TPM file(s) and VARS file
    /// in one directory, swapped in with one rename.
    pub fn write_kept(&self, uuid: &DomainUuid, state: &MachineState) -> Result<(), FsError> {
        let dir = self.uuid_dir(KEPT, uuid, true)?.expect("created");
        dir.replace_dir(
            machine_leaf(state.tpm.as_ref().map(|t| t.version)),
            &machine_files(state),
            Owner::current(),
        )
    }

    /// Saves `state` under `backups/<uuid>/<time>-<digest>-<leaf>/` and keeps
    /// only the newest `keep` backups of that domain.
    pub fn backup(
        &self,
        uuid: &DomainUuid,
        state: &MachineState,
        keep: usize,
    ) -> Result<PathBuf, FsError> {
        let dir = self.uuid_dir(BACKUPS, uuid, true)?.expect("created");
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
        if dir.entry(&name)? == EntryKind::Missing {
            dir.replace_dir(&name, &machine_files(state), Owner::current())?;
        }
        let mut names: Vec<String> = dir
            .list()?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let excess = names.len().saturating_sub(keep.max(1));
        for old in &names[..excess] {
            dir.remove_tree(old, &format!(".{old}{OLD_MARK}"))?;
        }
        Ok(dir.path().join(name))
    }

    /// Removes what interrupted earlier runs left in this domain's own data
    /// (temp and old dirs of kept copies and backups, temp files of `J`).
    /// Call with the domain's lock held: every writer of these holds it.
    /// Failures are logged.
    pub fn remove_leftovers(&self, uuid: &DomainUuid) {
        let ours = |name: &str| {
            name.starts_with('.') && (name.contains(TEMP_MARK) || name.contains(OLD_MARK))
        };
        for section in [KEPT, BACKUPS] {
            match self.uuid_dir(section, uuid, false) {
                Ok(Some(dir)) => dir.remove_matching(ours, uuid.as_str()),
                Ok(None) => {}
                Err(e) => log::warn!("{e}"),
            }
        }
        match self.section(Anchor::Data, SYNCED, false) {
            Ok(Some(dir)) => {
                let prefix = format!(".{uuid}{TEMP_MARK}");
                dir.remove_matching(|n| n.starts_with(&prefix), uuid.as_str());
            }
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    /// `J`: the digest this host last synced with the metadata for `uuid`.
    pub fn read_synced(&self, uuid: &DomainUuid) -> Result<Option<Sha256Sum>, FsError> {
        let Some(dir) = self.section(Anchor::Data, SYNCED, false)? else {
            return Ok(None);
        };
        Ok(dir
            .read_file(uuid.as_str(), 256)?
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
            fault::point("sync.kept").map_err(|e| io_err("write", &self.paths.data_dir(), e))?;
        }
        // Already recorded: write nothing (an unchanged store stays a read).
        if self.read_synced(uuid)? == Some(state.digest()) {
            return Ok(());
        }
        let dir = self.section(Anchor::Data, SYNCED, true)?.expect("created");
        write_private_file(
            &dir,
            uuid.as_str(),
            format!("{}\n", state.digest()).as_bytes(),
        )
    }

    /// Marks that the next `prepare` of `uuid` is an incoming migration or a
    /// restore from a save image, and must not restore.
    pub fn set_incoming(&self, uuid: &DomainUuid, op: &str) -> Result<(), FsError> {
        let dir = self.section(Anchor::Run, INCOMING, true)?.expect("created");
        write_private_file(&dir, uuid.as_str(), format!("{op}\n").as_bytes())
    }

    /// Whether a fresh (younger than [`MARKER_TTL`]) incoming marker exists.
    pub fn incoming(&self, uuid: &DomainUuid) -> Result<bool, FsError> {
        let Some(dir) = self.section(Anchor::Run, INCOMING, false)? else {
            return Ok(false);
        };
        if !dir.check_file(uuid.as_str())? {
            return Ok(false);
        }
        let age = dir
            .modified(uuid.as_str())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        Ok(age < MARKER_TTL)
    }

    /// Whether any incoming marker exists at all (cheap: one directory read).
    pub fn any_incoming(&self) -> bool {
        matches!(
            self.section(Anchor::Run, INCOMING, false),
            Ok(Some(d)) if d.list().is_ok_and(|l| !l.is_empty())
        )
    }

    pub fn clear_incoming(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        match self.section(Anchor::Run, INCOMING, false)? {
            Some(dir) => dir.remove_file(uuid.as_str()),
            None => Ok(()),
        }
    }

    /// Takes the per-domain lock that serialises hook, `store` and `restore`,
    /// waiting at most `timeout`.
    pub fn lock(&self, uuid: &DomainUuid, timeout: Duration) -> Result<DomainLock, FsError> {
        let dir = self.section(Anchor::Run, LOCKS, true)?.expect("created");
        let name = format!("{uuid}.lock");
        let fd = dir.open_lock_file(&name)?;
        let start = Instant::now();
        loop {
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DomainLock { _fd: fd }),
                Err(Errno::WOULDBLOCK) | Err(Errno::INTR) => {
                    if start.elapsed() >= timeout {
                        return Err(FsError::LockTimeout {
                            uuid: uuid.clone(),
                            secs: timeout.as_secs(),
                            lock: dir.path().join(&name),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => return Err(io_err("lock", &dir.path().join(&name), e)),
            }
        }
    }

    /// Takes the one-daemon-per-host lock of `watch` (`<run>/watch.lock`)
    /// without waiting: `Ok(None)` when another process holds it.
    pub fn try_lock_watch(&self) -> Result<Option<OwnedFd>, FsError> {
        let dir = Anchor::Run.open_or_create(&self.paths, DIR_MODE)?;
        let fd = dir.open_lock_file("watch.lock")?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(fd)),
            Err(Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(io_err("lock", &dir.path().join("watch.lock"), e)),
        }
    }

    /// Publishes `text` as `<run>/<name>` (mode 0644: `status` reads it
    /// without root), replaced atomically.
    pub fn write_run_file(&self, name: &str, text: &[u8]) -> Result<(), FsError> {
        Anchor::Run
            .open_or_create(&self.paths, DIR_MODE)?
            .write_file_atomically(name, text, 0o644)
    }

    /// Reads `<run>/<name>` (at most `max` bytes).
    pub fn read_run_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, FsError> {
        match Anchor::Run.open(&self.paths)? {
            Some(dir) => dir.read_file(name, max),
            None => Ok(None),
        }
    }
}

/// Writes a root-only file atomically (0600; temp file, fsync, rename).
fn write_private_file(dir: &Dir, name: &str, data: &[u8]) -> Result<(), FsError> {
    dir.write_file_atomically(name, data, FILE_MODE)
}

/// Held while working on one domain; released on drop (or process exit).
#[derive(Debug)]
pub struct DomainLock {
    _fd: OwnedFd,
}
