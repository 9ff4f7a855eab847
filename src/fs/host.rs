//! Our own data for one host: copies kept at stop, backups, the sync
//! journal (`J`), markers and locks. All root-only, below our anchors
//! (`/var/lib/virt-tpm-state`, `/run/virt-tpm-state`).

use super::dir::{Dir, EntryKind, DIR_MODE, FILE_MODE, OLD_MARK, TEMP_MARK};
use super::error::{io_err, FsError};
use super::locations::read_tpm_files;
use super::owner::Owner;
use super::Anchor;
use crate::fault;
use crate::paths::Paths;
use crate::state::{
    DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, VarsKind,
};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// How long a "do not restore" marker from `migrate`/`restore begin` is
/// honoured: the `prepare` it is meant for follows within seconds.
pub(crate) const MARKER_TTL: Duration = Duration::from_secs(300);

/// Upper bound for reading our own kept copies (we wrote them, within the
/// configured per-file cap, which cannot exceed this in practice).
const KEPT_READ_LIMIT: u64 = 64 * 1024 * 1024;

const KEPT: &str = "kept";
const BACKUPS: &str = "backups";
const SYNCED: &str = "synced";
const INCOMING: &str = "incoming";
/// `release end` with reason `from snapshot` (libvirt >= 10.5): a revert
/// stopped the domain; the `prepare` that follows is the revert's start.
const REVERTED: &str = "reverted";
const LOCKS: &str = "locks";
const INTENTS: &str = "intents";
const REVERTS: &str = "reverts";
/// What `snapshot create` verified: `snapshots/<uuid>/<sha256 of the name>`
/// holds the digest of the element the snapshot got, current when taken.
const SNAPSHOTS: &str = "snapshots";

/// How long a revert intent waits for the `prepare` it is meant for (a VM
/// reverted while shut off may be started much later). Past this it is
/// ignored and removed: the rule without it never rolls back.
pub(crate) const REVERT_TTL: Duration = Duration::from_secs(30 * 86400);

/// Post-stop stores not yet done: `<data>/pending/<uuid>`.
const PENDING: &str = "pending";
/// The text file of an intent dir (beside the target's state files).
const INTENT_FILE: &str = "intent";

/// What our data dir holds for one domain (kept copy, backups, `J`,
/// intent): bytes on disk and the newest modification among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DomainData {
    pub(crate) uuid: DomainUuid,
    pub(crate) bytes: u64,
    pub(crate) newest: SystemTime,
}

/// Bytes and newest mtime of `name` in `dir` (a file, or a tree at most
/// `depth` levels deep; ours are two). Links are counted, never followed.
fn usage_of(dir: &Dir, name: &str, depth: u32) -> (u64, SystemTime) {
    let (size, mut newest) = dir
        .size_and_modified(name)
        .unwrap_or((0, SystemTime::UNIX_EPOCH));
    if !matches!(dir.entry(name), Ok(EntryKind::Dir)) {
        return (size, newest);
    }
    // A directory counts what it holds (file bytes), not itself.
    let mut bytes = 0;
    if depth > 0 {
        if let Ok(Some(sub)) = dir.open_subdir(name) {
            for n in sub.list().unwrap_or_default() {
                let (b, t) = usage_of(&sub, &n, depth - 1);
                bytes += b;
                newest = newest.max(t);
            }
        }
    }
    (bytes, newest)
}

/// An unfinished restore (docs/FORMAT.md §6, "The restore journal"):
/// recorded before the first rename of a restore, removed after `J`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Intent {
    /// The state being restored (TPM files and VARS file, all of it).
    pub(crate) target: MachineState,
    /// Where its TPM state goes (the state dir or file), if it has one.
    pub(crate) tpm_at: Option<PathBuf>,
    /// Where its VARS file goes, if it has one.
    pub(crate) nvram_at: Option<PathBuf>,
    /// The backup holding the state it replaces, if any.
    pub(crate) backup: Option<PathBuf>,
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn path_field(p: Option<&PathBuf>) -> String {
    use std::os::unix::ffi::OsStrExt;
    p.map_or("-".to_string(), |p| hex_bytes(p.as_os_str().as_bytes()))
}

fn parse_path_field(s: &str) -> Option<Option<PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    if s == "-" {
        return Some(None);
    }
    unhex_bytes(s).map(|b| Some(PathBuf::from(std::ffi::OsString::from_vec(b))))
}

impl Intent {
    /// The intent file: `key value` lines; paths hex-encoded (any byte).
    fn text(&self) -> String {
        format!(
            "vts-intent 1\ntarget {}\ntpm {}\ntpm_at {}\nnvram_at {}\nbackup {}\n",
            self.target.digest(),
            self.target.tpm.as_ref().map_or("-", |t| t.version.as_str()),
            path_field(self.tpm_at.as_ref()),
            path_field(self.nvram_at.as_ref()),
            path_field(self.backup.as_ref()),
        )
    }
}

/// A snapshot revert asked for explicitly (`snapshot revert`, or the watch
/// daemon seeing libvirt's from-snapshot event): the next `prepare` whose
/// element has this digest restores it whatever the local state, backing
/// the local state up (docs/SNAPSHOTS.md). Names the element by its digest,
/// so a stale XML that merely looks older never qualifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RevertIntent {
    /// The `digest` of the snapshot's element.
    pub(crate) digest: Sha256Sum,
    /// The snapshot's name (for messages only).
    pub(crate) snapshot: String,
    /// Who recorded it: `cli` or `watch`.
    pub(crate) by: String,
}

impl RevertIntent {
    fn text(&self) -> String {
        format!(
            "vts-revert 1\ndigest {}\nsnapshot {}\nby {}\n",
            self.digest,
            hex_bytes(self.snapshot.as_bytes()),
            hex_bytes(self.by.as_bytes())
        )
    }

    fn parse(text: &str) -> Option<RevertIntent> {
        let mut fields = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(' ') {
                fields.insert(k, v);
            }
        }
        if fields.get("vts-revert") != Some(&"1") {
            return None;
        }
        let hex_text = |k: &str| {
            fields
                .get(k)
                .and_then(|v| unhex_bytes(v))
                .and_then(|b| String::from_utf8(b).ok())
        };
        Some(RevertIntent {
            digest: fields.get("digest").and_then(|d| Sha256Sum::parse_hex(d))?,
            snapshot: hex_text("snapshot")?,
            by: hex_text("by")?,
        })
    }
}

/// A post-stop store that has not finished (issue 22): the stop kept
/// `digest` as the domain's final state at `since`, and nobody has stored it
/// into the metadata yet. Written by the hook at `stopped end` (before
/// anything talks to libvirt, so a killed or timed-out store leaves it);
/// removed by whoever completes it (see `store::pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingStore {
    pub(crate) uuid: DomainUuid,
    pub(crate) digest: Sha256Sum,
    pub(crate) since: SystemTime,
}

impl PendingStore {
    fn text(&self) -> String {
        format!(
            "vts-pending 1\ndigest {}\nsince {}\n",
            self.digest,
            humantime::format_rfc3339_nanos(self.since)
        )
    }

    fn parse(uuid: DomainUuid, text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "vts-pending 1" {
            return None;
        }
        let mut digest = None;
        let mut since = None;
        for line in lines {
            match line.split_once(' ') {
                Some(("digest", v)) => digest = Sha256Sum::parse_hex(v),
                Some(("since", v)) => since = humantime::parse_rfc3339(v).ok(),
                _ => {}
            }
        }
        Some(PendingStore {
            uuid,
            digest: digest?,
            since: since?,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HostData {
    paths: Paths,
}

/// The leaf of a kept copy or backup: the TPM's state subdir (the VARS
/// file, if any, beside the permall in the same dir, so that one rename
/// swaps both), or `nvram` for a state without a TPM.
fn machine_leaf(tpm: Option<TpmVersion>) -> &'static str {
    tpm.map_or("nvram", TpmVersion::state_subdir)
}

/// Every file of a machine state, flat: what a kept copy or backup holds.
/// The variable store of a kept copy or intent dir: the one file named for
/// its kind (`VARS.fd` or `varstore.json`; a dir holds at most one, as a
/// state does).
fn read_vars(dir: &Dir, max: u64) -> Result<Option<StateFile>, FsError> {
    for kind in [VarsKind::Nvram, VarsKind::Varstore] {
        if let Some(data) = dir.read_file(kind.file_name(), max)? {
            return Ok(Some(StateFile {
                name: kind.file_name().to_string(),
                data,
            }));
        }
    }
    Ok(None)
}

fn machine_files(state: &MachineState) -> Vec<StateFile> {
    state
        .sections()
        .into_iter()
        .map(|(_, f)| f.clone())
        .collect()
}

impl HostData {
    pub(crate) fn new(paths: &Paths) -> Self {
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
    pub(crate) fn read_kept_state(
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
            Some(version) => match read_tpm_files(&dir, version, max)? {
                Some(t) => Some(t),
                None => return Ok(None),
            },
            None => None,
        };
        let vars = if nvram { read_vars(&dir, max)? } else { None };
        let state = MachineState {
            tpm: tpm_state,
            nvram: vars,
        };
        Ok((!state.is_empty()).then_some(state))
    }

    /// Replaces the kept copy with `state`: its TPM file(s) and VARS file
    /// in one directory, swapped in with one rename.
    pub(crate) fn write_kept(
        &self,
        uuid: &DomainUuid,
        state: &MachineState,
    ) -> Result<(), FsError> {
        let dir = self.uuid_dir(KEPT, uuid, true)?.expect("created");
        dir.replace_dir(
            machine_leaf(state.tpm.as_ref().map(|t| t.version)),
            &machine_files(state),
            Owner::current(),
        )
    }

    /// Saves `state` under `backups/<uuid>/<time>-<digest>-<leaf>/` and keeps
    /// only the newest `keep` backups of that domain.
    pub(crate) fn backup(
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

    /// Records the intent of a restore (target state and where it goes, and
    /// the backup of what it replaces) in `<data>/intents/<uuid>/`, built
    /// aside, fsynced, swapped in with one rename: it is there whole or not
    /// at all. Call with the domain's lock held, before the first rename
    /// of the restore.
    pub(crate) fn write_intent(&self, uuid: &DomainUuid, intent: &Intent) -> Result<(), FsError> {
        let dir = self.section(Anchor::Data, INTENTS, true)?.expect("created");
        let mut files = machine_files(&intent.target);
        files.push(StateFile {
            name: INTENT_FILE.to_string(),
            data: intent.text().into_bytes(),
        });
        dir.replace_dir(uuid.as_str(), &files, Owner::current())?;
        fault::point("restore.intent")
            .map_err(|e| io_err("write", &dir.path().join(uuid.as_str()), e))
    }

    /// Whether an unfinished restore of `uuid` is recorded (cheap).
    pub(crate) fn has_intent(&self, uuid: &DomainUuid) -> Result<bool, FsError> {
        match self.section(Anchor::Data, INTENTS, false)? {
            Some(d) => Ok(d.entry(uuid.as_str())? != EntryKind::Missing),
            None => Ok(false),
        }
    }

    /// The unfinished restore of `uuid`, if any. An intent dir that does not
    /// read back whole (its files do not match its digest) is an error:
    /// it was swapped in whole, so someone changed it.
    pub(crate) fn read_intent(&self, uuid: &DomainUuid) -> Result<Option<Intent>, FsError> {
        let Some(section) = self.section(Anchor::Data, INTENTS, false)? else {
            return Ok(None);
        };
        let Some(dir) = section.open_subdir(uuid.as_str())? else {
            return Ok(None);
        };
        let path = dir.path().to_path_buf();
        let bad = |why: &'static str| FsError::unsafe_path(path.clone(), why);
        let text = dir
            .read_file(INTENT_FILE, 64 * 1024)?
            .ok_or_else(|| bad("an intent dir without its intent file"))?;
        let text = String::from_utf8(text).map_err(|_| bad("an unreadable intent file"))?;
        let mut fields = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(' ') {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        let field = |k: &str| fields.get(k).map(String::as_str);
        if field("vts-intent") != Some("1") {
            return Err(bad("an intent file of an unknown format"));
        }
        let target = field("target")
            .and_then(Sha256Sum::parse_hex)
            .ok_or_else(|| bad("an intent file without a target digest"))?;
        let version = match field("tpm") {
            Some("-") => None,
            Some(v) => Some(TpmVersion::parse(v).ok_or_else(|| bad("an unknown TPM version"))?),
            None => return Err(bad("an intent file without a tpm line")),
        };
        let p = |k: &str| {
            field(k)
                .and_then(parse_path_field)
                .ok_or_else(|| bad("an intent file with a bad path"))
        };
        let (tpm_at, nvram_at, backup) = (p("tpm_at")?, p("nvram_at")?, p("backup")?);
        let tpm = match version {
            Some(v) => Some(
                read_tpm_files(&dir, v, KEPT_READ_LIMIT)?
                    .ok_or_else(|| bad("an intent dir without its TPM state"))?,
            ),
            None => None,
        };
        let nvram = if nvram_at.is_some() {
            Some(
                read_vars(&dir, KEPT_READ_LIMIT)?
                    .ok_or_else(|| bad("an intent dir without its VARS file"))?,
            )
        } else {
            None
        };
        let state = MachineState { tpm, nvram };
        if state.digest() != target {
            return Err(bad("an intent dir whose files do not match its digest"));
        }
        Ok(Some(Intent {
            target: state,
            tpm_at,
            nvram_at,
            backup,
        }))
    }

    /// Removes the intent of `uuid`: the restore is complete (`J` written).
    pub(crate) fn clear_intent(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        let Some(dir) = self.section(Anchor::Data, INTENTS, false)? else {
            return Ok(());
        };
        dir.remove_tree(uuid.as_str(), &format!(".{uuid}{OLD_MARK}"))?;
        dir.sync()?;
        fault::point("restore.intent_cleared")
            .map_err(|e| io_err("remove", &dir.path().join(uuid.as_str()), e))
    }

    /// Records a snapshot revert of `uuid` (`<data>/reverts/<uuid>`, 0600,
    /// atomic), replacing an earlier one.
    pub(crate) fn write_revert(
        &self,
        uuid: &DomainUuid,
        intent: &RevertIntent,
    ) -> Result<(), FsError> {
        let dir = self.section(Anchor::Data, REVERTS, true)?.expect("created");
        write_private_file(&dir, uuid.as_str(), intent.text().as_bytes())
    }

    /// The revert recorded for `uuid`, if any and younger than
    /// [`REVERT_TTL`]. An expired or unreadable one is removed (logged).
    pub(crate) fn read_revert(&self, uuid: &DomainUuid) -> Result<Option<RevertIntent>, FsError> {
        let Some(dir) = self.section(Anchor::Data, REVERTS, false)? else {
            return Ok(None);
        };
        let Some(text) = dir.read_file(uuid.as_str(), 4096)? else {
            return Ok(None);
        };
        let age = dir
            .modified(uuid.as_str())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        let intent = RevertIntent::parse(&String::from_utf8_lossy(&text));
        match intent {
            Some(i) if age < REVERT_TTL => Ok(Some(i)),
            _ => {
                log::warn!(
                    "VM {uuid}: ignoring and removing {} revert intent",
                    if age >= REVERT_TTL {
                        "an expired"
                    } else {
                        "an unreadable"
                    }
                );
                dir.remove_file(uuid.as_str())?;
                Ok(None)
            }
        }
    }

    /// Removes the revert intent of `uuid` (consumed, or superseded).
    pub(crate) fn clear_revert(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        match self.section(Anchor::Data, REVERTS, false)? {
            Some(dir) => dir.remove_file(uuid.as_str()),
            None => Ok(()),
        }
    }

    /// Records that snapshot `name` of `uuid` was taken with `digest` in
    /// its element, the local state stored right before (`snapshot create`).
    pub(crate) fn record_snapshot(
        &self,
        uuid: &DomainUuid,
        name: &str,
        digest: &Sha256Sum,
    ) -> Result<(), FsError> {
        let dir = self.uuid_dir(SNAPSHOTS, uuid, true)?.expect("created");
        write_private_file(
            &dir,
            &Sha256Sum::of(name.as_bytes()).to_string(),
            format!("{digest}\n").as_bytes(),
        )
    }

    /// The digest [`HostData::record_snapshot`] recorded for snapshot `name`.
    pub(crate) fn snapshot_record(
        &self,
        uuid: &DomainUuid,
        name: &str,
    ) -> Result<Option<Sha256Sum>, FsError> {
        let Some(dir) = self.uuid_dir(SNAPSHOTS, uuid, false)? else {
            return Ok(None);
        };
        Ok(dir
            .read_file(&Sha256Sum::of(name.as_bytes()).to_string(), 256)?
            .and_then(|b| Sha256Sum::parse_hex(String::from_utf8_lossy(&b).trim())))
    }

    /// Every domain our data dir holds something for, with its usage
    /// (issue 17: garbage collection). Names that are not UUIDs (our temp
    /// names) count toward no domain.
    pub(crate) fn scan_domains(&self) -> Result<Vec<DomainData>, FsError> {
        let mut all: std::collections::BTreeMap<String, DomainData> = Default::default();
        for (section, depth) in [
            (KEPT, 2),
            (BACKUPS, 2),
            (SYNCED, 0),
            (INTENTS, 1),
            (REVERTS, 0),
            (SNAPSHOTS, 1),
            (PENDING, 0),
        ] {
            let Some(dir) = self.section(Anchor::Data, section, false)? else {
                continue;
            };
            for name in dir.list()? {
                let Some(uuid) = DomainUuid::parse(&name) else {
                    continue;
                };
                let (bytes, newest) = usage_of(&dir, &name, depth);
                let d = all.entry(uuid.to_string()).or_insert(DomainData {
                    uuid,
                    bytes: 0,
                    newest: SystemTime::UNIX_EPOCH,
                });
                d.bytes += bytes;
                d.newest = d.newest.max(newest);
            }
        }
        Ok(all.into_values().collect())
    }

    /// Removes everything our data dir holds for `uuid` (kept copy,
    /// backups, `J`, intent). Call with the domain's lock held, only for a
    /// domain libvirt no longer knows.
    pub(crate) fn remove_domain_data(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        for section in [KEPT, BACKUPS, INTENTS, SNAPSHOTS] {
            if let Some(dir) = self.section(Anchor::Data, section, false)? {
                if dir.entry(uuid.as_str())? != EntryKind::Missing {
                    dir.remove_tree(uuid.as_str(), &format!(".{uuid}{OLD_MARK}"))?;
                }
            }
        }
        for section in [SYNCED, REVERTS, PENDING] {
            if let Some(dir) = self.section(Anchor::Data, section, false)? {
                dir.remove_file(uuid.as_str())?;
            }
        }
        Ok(())
    }

    /// Takes the lock of `uuid` only if nobody holds it (for GC: a domain
    /// someone works on is skipped, never waited for).
    pub(crate) fn try_lock(&self, uuid: &DomainUuid) -> Option<DomainLock> {
        self.lock(uuid, Duration::ZERO).ok()
    }

    /// Removes what interrupted earlier runs left in this domain's own data
    /// (temp and old dirs of kept copies and backups, temp files of `J`).
    /// Call with the domain's lock held: every writer of these holds it.
    /// Failures are logged.
    pub(crate) fn remove_leftovers(&self, uuid: &DomainUuid) {
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
        for section in [SYNCED, PENDING] {
            match self.section(Anchor::Data, section, false) {
                Ok(Some(dir)) => {
                    let prefix = format!(".{uuid}{TEMP_MARK}");
                    dir.remove_matching(|n| n.starts_with(&prefix), uuid.as_str());
                }
                Ok(None) => {}
                Err(e) => log::warn!("{e}"),
            }
        }
        match self.section(Anchor::Data, INTENTS, false) {
            Ok(Some(dir)) => dir.remove_leftovers_of(uuid.as_str()),
            Ok(None) => {}
            Err(e) => log::warn!("{e}"),
        }
    }

    /// `J`: the digest this host last synced with the metadata for `uuid`.
    pub(crate) fn read_synced(&self, uuid: &DomainUuid) -> Result<Option<Sha256Sum>, FsError> {
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
    pub(crate) fn record_sync(
        &self,
        uuid: &DomainUuid,
        state: &MachineState,
    ) -> Result<(), FsError> {
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

    /// Records that the final state `digest` of `uuid` (its kept copy) still
    /// has to be stored into the metadata: one small file, fsynced and
    /// renamed into place, replacing an older record of the same domain.
    /// Call with the domain's lock held.
    pub(crate) fn write_pending(
        &self,
        uuid: &DomainUuid,
        digest: Sha256Sum,
    ) -> Result<(), FsError> {
        let dir = self.section(Anchor::Data, PENDING, true)?.expect("created");
        let record = PendingStore {
            uuid: uuid.clone(),
            digest,
            since: SystemTime::now(),
        };
        write_private_file(&dir, uuid.as_str(), record.text().as_bytes())
    }

    /// The pending store of `uuid`, if any. A record that does not parse
    /// is an error (we wrote it whole; someone changed it).
    pub(crate) fn read_pending(&self, uuid: &DomainUuid) -> Result<Option<PendingStore>, FsError> {
        let Some(dir) = self.section(Anchor::Data, PENDING, false)? else {
            return Ok(None);
        };
        let Some(bytes) = dir.read_file(uuid.as_str(), 4096)? else {
            return Ok(None);
        };
        PendingStore::parse(uuid.clone(), &String::from_utf8_lossy(&bytes))
            .map(Some)
            .ok_or_else(|| {
                FsError::unsafe_path(
                    dir.path().join(uuid.as_str()),
                    "a pending-store record of an unknown format",
                )
            })
    }

    /// Every pending store on this host, oldest first (one directory read
    /// when there is none). Unreadable records are logged and skipped.
    pub(crate) fn list_pending(&self) -> Result<Vec<PendingStore>, FsError> {
        let Some(dir) = self.section(Anchor::Data, PENDING, false)? else {
            return Ok(Vec::new());
        };
        let mut all = Vec::new();
        for name in dir.list()? {
            let Some(uuid) = DomainUuid::parse(&name) else {
                continue;
            };
            match self.read_pending(&uuid) {
                Ok(Some(p)) => all.push(p),
                Ok(None) => {}
                Err(e) => log::warn!("{e}"),
            }
        }
        all.sort_by_key(|p| p.since);
        Ok(all)
    }

    /// Removes the pending store of `uuid` (done, or superseded). Call with
    /// the domain's lock held.
    pub(crate) fn clear_pending(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        match self.section(Anchor::Data, PENDING, false)? {
            Some(dir) => {
                dir.remove_file(uuid.as_str())?;
                dir.sync()
            }
            None => Ok(()),
        }
    }

    /// Marks that the next `prepare` of `uuid` is an incoming migration or a
    /// restore from a save image, and must not restore.
    pub(crate) fn set_incoming(&self, uuid: &DomainUuid, op: &str) -> Result<(), FsError> {
        let dir = self.section(Anchor::Run, INCOMING, true)?.expect("created");
        write_private_file(&dir, uuid.as_str(), format!("{op}\n").as_bytes())
    }

    /// Whether a fresh (younger than [`MARKER_TTL`]) incoming marker exists.
    pub(crate) fn incoming(&self, uuid: &DomainUuid) -> Result<bool, FsError> {
        self.fresh_marker(INCOMING, uuid)
    }

    /// Whether `<run>/<section>/<uuid>` exists and is younger than [`MARKER_TTL`].
    fn fresh_marker(&self, section: &str, uuid: &DomainUuid) -> Result<bool, FsError> {
        let Some(dir) = self.section(Anchor::Run, section, false)? else {
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

    fn clear_marker(&self, section: &str, uuid: &DomainUuid) -> Result<(), FsError> {
        match self.section(Anchor::Run, section, false)? {
            Some(dir) => dir.remove_file(uuid.as_str()),
            None => Ok(()),
        }
    }

    /// Marks that a snapshot revert stopped `uuid` (the hook's `release end`
    /// with reason `from snapshot`).
    pub(crate) fn set_reverted(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        let dir = self.section(Anchor::Run, REVERTED, true)?.expect("created");
        write_private_file(&dir, uuid.as_str(), b"from snapshot\n")
    }

    /// Whether a fresh (younger than [`MARKER_TTL`]) revert-stop marker exists.
    pub(crate) fn reverted(&self, uuid: &DomainUuid) -> Result<bool, FsError> {
        self.fresh_marker(REVERTED, uuid)
    }

    pub(crate) fn clear_reverted(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        self.clear_marker(REVERTED, uuid)
    }

    /// Whether any incoming marker exists at all (cheap: one directory read).
    pub(crate) fn any_incoming(&self) -> bool {
        matches!(
            self.section(Anchor::Run, INCOMING, false),
            Ok(Some(d)) if d.list().is_ok_and(|l| !l.is_empty())
        )
    }

    pub(crate) fn clear_incoming(&self, uuid: &DomainUuid) -> Result<(), FsError> {
        self.clear_marker(INCOMING, uuid)
    }

    /// Takes the per-domain lock that serialises hook, `store` and `restore`,
    /// waiting at most `timeout`.
    pub(crate) fn lock(&self, uuid: &DomainUuid, timeout: Duration) -> Result<DomainLock, FsError> {
        let dir = self.section(Anchor::Run, LOCKS, true)?.expect("created");
        let name = format!("{uuid}.lock");
        let mut file = dir.open_lock_file(&name)?;
        let start = Instant::now();
        loop {
            match try_lock_exclusive(file) {
                Ok(Ok(held)) => {
                    return Ok(DomainLock {
                        uuid: uuid.clone(),
                        _lock: held,
                    })
                }
                Ok(Err(busy)) => {
                    file = busy;
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
    pub(crate) fn try_lock_watch(&self) -> Result<Option<WatchLock>, FsError> {
        let dir = Anchor::Run.open_or_create(&self.paths, DIR_MODE)?;
        let file = dir.open_lock_file("watch.lock")?;
        match try_lock_exclusive(file) {
            Ok(Ok(held)) => Ok(Some(WatchLock { _lock: held })),
            Ok(Err(_busy)) => Ok(None),
            Err(e) => Err(io_err("lock", &dir.path().join("watch.lock"), e)),
        }
    }

    /// Publishes `text` as `<run>/<name>` (mode 0644: `status` reads it
    /// without root), replaced atomically.
    pub(crate) fn write_run_file(&self, name: &str, text: &[u8]) -> Result<(), FsError> {
        Anchor::Run
            .open_or_create(&self.paths, DIR_MODE)?
            .write_file_atomically(name, text, 0o644)
    }

    /// Writes the hint `<run>/<name>` (0600; see [`Dir::write_hint`]).
    pub(crate) fn write_run_hint(
        &self,
        name: &str,
        text: &[u8],
        append: bool,
    ) -> Result<(), FsError> {
        Anchor::Run
            .open_or_create(&self.paths, DIR_MODE)?
            .write_hint(name, text, FILE_MODE, append)
    }

    /// Reads `<run>/<name>` (at most `max` bytes).
    pub(crate) fn read_run_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, FsError> {
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

/// `flock(LOCK_EX | LOCK_NB)` on `file`: `Ok(Ok(lock))` holds it until
/// dropped (or the process exits), `Ok(Err(file))` when another process
/// holds it.
fn try_lock_exclusive(mut file: File) -> Result<Result<Flock<File>, File>, Errno> {
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(Ok(held)),
            Err((busy, Errno::EWOULDBLOCK)) => return Ok(Err(busy)),
            Err((again, Errno::EINTR)) => file = again,
            Err((_, e)) => return Err(e),
        }
    }
}

/// Held while working on one domain; released on drop (or process exit).
#[derive(Debug)]
pub(crate) struct DomainLock {
    uuid: DomainUuid,
    _lock: Flock<File>,
}

/// The one-daemon-per-host lock of `watch`, held while it runs.
#[derive(Debug)]
pub(crate) struct WatchLock {
    _lock: Flock<File>,
}

impl DomainLock {
    /// The domain this lock is for.
    pub(crate) fn uuid(&self) -> &DomainUuid {
        &self.uuid
    }
}
