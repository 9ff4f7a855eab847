//! Apply: carry out a decision. A restore of the element is journaled: the
//! intent first, then a backup of the state it replaces, the VARS file and
//! the TPM state (`fs`, one rename each), J and the kept copy, and the
//! intent cleared last. A run that finds an intent finishes it before it
//! decides anything ([`finish_intent`]), so TPM and VARS are always of one
//! generation.

use super::error::ErrorKind;
use super::gather::{destinations, Element, Local};
use super::Outcome;
use crate::carried::Carried;
use crate::config::Config;
use crate::decision::{Decision, Refusal, Why};
use crate::fs::{FsError, HostData, Intent, NvramLocation, Owner, StateLocation};
use crate::name::DomainName;
use crate::paths::Paths;
use crate::state::{DomainUuid, MachineState, TpmState, TpmVersion};
use std::path::PathBuf;

/// Where a decision is carried out: the domain, its element's side, and
/// our data for it (whose lock the caller holds).
pub(super) struct Apply<'a> {
    pub(crate) paths: &'a Paths,
    pub(crate) config: &'a Config,
    pub(crate) host: &'a HostData,
    pub(crate) name: &'a DomainName,
    pub(crate) uuid: &'a DomainUuid,
    pub(crate) element: &'a Element,
}

/// Carries out `decision` on the local side it was made from.
pub(super) fn apply(a: &Apply, decision: Decision, local: &Local) -> Result<Outcome, ErrorKind> {
    let e = a.element;
    match decision {
        Decision::Nothing(why) => {
            if why == Why::AlreadyCurrent {
                a.host.record_sync(a.uuid, &e.target)?;
            }
            Ok(Outcome::Unchanged {
                why,
                location: e.shown_location(),
            })
        }
        Decision::RestoreKept(why) => {
            restore_kept(a, why, local.kept.as_ref().expect("decided on a kept copy"))
        }
        Decision::RestoreMetadata { backup_local, why } => {
            let replaced = local.live.as_ref().or(local.kept.as_ref());
            restore_element(a, why, replaced.filter(|_| backup_local))
        }
        Decision::Refuse(Refusal::Clone { element_uuid }) => Err(ErrorKind::Clone {
            uuid: a.uuid.clone(),
            element_uuid,
            ns: a.config.namespace.clone(),
        }),
        Decision::Refuse(Refusal::Conflict { metadata, local }) => Err(ErrorKind::Conflict {
            local: local.short(),
            metadata: metadata.short(),
        }),
    }
}

/// Puts the copy kept at the last stop back (not journaled: it is written
/// whole again by the next run if this one is interrupted).
fn restore_kept(a: &Apply, why: Why, state: &MachineState) -> Result<Outcome, ErrorKind> {
    let e = a.element;
    crate::gc::enforce(a.paths, a.config, a.uuid, state.total_size() as u64);
    let backup = backup_stray_vars(a, state)?;
    write_state(a.paths, state, e.tpm_location(), e.nvram_location())?;
    if why == Why::AlreadyCurrent {
        a.host.record_sync(a.uuid, &e.target)?;
    }
    Ok(Outcome::Restored {
        why,
        digest: state.digest(),
        size: state.total_size(),
        location: e.shown_location(),
        nvram: shown_nvram(e, state),
        backup,
        generation: None,
    })
}

/// Restores the element's state, journaled; `replaced` is the local state
/// to back up first (when the decision asks for a backup).
fn restore_element(
    a: &Apply,
    why: Why,
    replaced: Option<&MachineState>,
) -> Result<Outcome, ErrorKind> {
    let e = a.element;
    let target = &e.target;
    // Room first: a backup and a kept copy are about to be written.
    let local_size = replaced.map_or(0, MachineState::total_size);
    let room = (local_size + target.total_size()) as u64;
    crate::gc::enforce(a.paths, a.config, a.uuid, room);
    let backup = match replaced {
        Some(local) => Some(a.host.backup(a.uuid, local, a.config.backups_per_domain)?),
        None => backup_stray_vars(a, target)?,
    };
    fault("restore.backed_up")?;
    // A missing nvram dir refuses before the journal is touched.
    if let (Some(_), Some(l)) = (&target.nvram, e.nvram_location()) {
        l.check_dir_exists()?;
    }
    write_journaled(a, backup.clone())?;
    fault("restore.written")?;
    a.host.record_sync(a.uuid, target)?;
    fault("restore.synced")?;
    a.host.clear_intent(a.uuid)?;
    Ok(Outcome::Restored {
        why,
        digest: target.digest(),
        size: target.total_size(),
        location: e.shown_location(),
        nvram: shown_nvram(e, target),
        backup,
        generation: Some(e.metadata.provenance.generation),
    })
}

/// The intent, then the write. From the intent until J, the next run on
/// this VM finishes this restore before it decides anything.
fn write_journaled(a: &Apply, backup: Option<PathBuf>) -> Result<(), ErrorKind> {
    let e = a.element;
    let max = a.config.max_file_size;
    // What is live now, to tell a failed write that changed nothing.
    let before = live_now(e, max);
    let (tpm_at, nvram_at) = e.destinations(&e.target);
    let intent = Intent {
        target: e.target.clone(),
        tpm_at,
        nvram_at,
        backup,
    };
    a.host.write_intent(a.uuid, &intent)?;
    if let Err(err) = write_state(a.paths, &e.target, e.tpm_location(), e.nvram_location()) {
        // Failed (not killed): when nothing live changed, the intent goes
        // too, so "nothing was written" stays true. Otherwise it stays for
        // the next run to finish.
        if live_now(e, max) == before {
            if let Err(clear) = a.host.clear_intent(a.uuid) {
                log::warn!("VM {}: {clear}", a.name);
            }
        }
        return Err(err);
    }
    Ok(())
}

/// The live TPM state and VARS file at the target's locations, as read
/// now (an unreadable one counts as absent).
type LiveNow = (Option<Option<TpmState>>, Option<Option<Vec<u8>>>);

fn live_now(e: &Element, max: u64) -> LiveNow {
    let version = e
        .target
        .tpm
        .as_ref()
        .map_or(TpmVersion::V2_0, |t| t.version);
    (
        e.tpm_location()
            .map(|l| l.read(version, max).ok().flatten()),
        e.nvram_location().map(|l| l.read(max).ok().flatten()),
    )
}

/// The VARS file a report names beside the TPM state, if `state` has one.
fn shown_nvram(e: &Element, state: &MachineState) -> Option<PathBuf> {
    state
        .nvram
        .as_ref()
        .and(e.tpm_location())
        .and(e.nvram_location())
        .map(NvramLocation::path)
}

/// A VARS file present while the TPM state is not (`undefine
/// --keep-nvram`, a TPM dir deleted by hand) is not part of L, yet a
/// restore replaces it: back it up first when it differs, so nothing is
/// lost without a copy.
fn backup_stray_vars(a: &Apply, target: &MachineState) -> Result<Option<PathBuf>, ErrorKind> {
    let (Some(l), Some(want)) = (a.element.nvram_location(), &target.nvram) else {
        return Ok(None);
    };
    match l.read(a.config.max_file_size)? {
        Some(v) if v != want.data => {
            let stray = MachineState::with_vars(None, l.kind(), Some(v));
            Ok(Some(a.host.backup(
                a.uuid,
                &stray,
                a.config.backups_per_domain,
            )?))
        }
        _ => Ok(None),
    }
}

/// Writes one machine state: the VARS file first, then the TPM state (one
/// rename each). Idempotent: a restore interrupted anywhere is finished by
/// writing the same state again.
fn write_state(
    paths: &Paths,
    state: &MachineState,
    tpm_location: Option<&StateLocation>,
    nvram_location: Option<&NvramLocation>,
) -> Result<(), ErrorKind> {
    if let (Some(vars), Some(l)) = (&state.nvram, nvram_location) {
        l.replace(&vars.data, Owner::qemu(paths)?)?;
    }
    if let (Some(tpm), Some(l)) = (&state.tpm, tpm_location) {
        l.replace(tpm.version, tpm.files(), Owner::swtpm(paths)?)?;
    }
    Ok(())
}

/// Finishes a restore that an earlier run on this VM recorded and did not
/// complete (killed, or failed after its first rename): writes the whole
/// target state again (VARS file, TPM state), records `J`, removes the
/// intent. So the live TPM and VARS are always of one generation, whatever
/// XML this run got, before anything reads or decides on them. Call with
/// the domain's lock held. The target locations must be the ones this XML
/// names (else exit 8: the admin finishes it with the XML it was for).
pub(super) fn finish_intent(
    paths: &Paths,
    host: &HostData,
    uuid: &DomainUuid,
    name: &DomainName,
    carried: &Carried,
) -> Result<(), ErrorKind> {
    let Some(intent) = host.read_intent(uuid)? else {
        return Ok(());
    };
    let tpm_location = carried.tpm.as_ref().map(|(_, l)| l);
    let nvram_location = carried.nvram.as_ref();
    let here = destinations(&intent.target, tpm_location, nvram_location);
    if here != (intent.tpm_at.clone(), intent.nvram_at.clone()) {
        let shown = |p: PathBuf| crate::logging::escaped(&p.to_string_lossy());
        return Err(ErrorKind::UnfinishedElsewhere {
            tpm: intent.tpm_at.map(shown),
            nvram: intent.nvram_at.map(shown),
            digest: intent.target.digest().short(),
        });
    }
    write_state(paths, &intent.target, tpm_location, nvram_location)?;
    host.record_sync(uuid, &intent.target)?;
    host.clear_intent(uuid)?;
    log::info!(
        "VM {name} ({uuid}): finished an interrupted restore (digest {}, {} bytes){}",
        intent.target.digest().short(),
        intent.target.total_size(),
        intent
            .backup
            .map(|b| format!("; the state it replaced is in {}", b.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// A fault point of the `fault-injection` test build (nothing otherwise).
pub(super) fn fault(point: &'static str) -> Result<(), ErrorKind> {
    crate::fault::point(point).map_err(|source| {
        ErrorKind::Fs(FsError::Io {
            action: "continue at",
            path: PathBuf::from(point),
            source,
        })
    })
}
