//! Pending post-stop stores (issue 22): finishing what a `store --after-stop`
//! could not (libvirt stopped with the host, the store was killed or timed
//! out).
//!
//! The hook records the store as pending at `stopped end`, under the
//! domain's lock and before anything talks to libvirt (`fs::PendingStore`).
//! Whoever runs next with libvirt reachable completes it, under the same
//! lock: the post-stop store itself, the next `store`, the watch daemon at
//! start, after every reconnect and at each reconcile, and
//! `virt-tpm-state sync --pending` (run at boot on hosts without the daemon).
//!
//! **Only the pending-store path writes a stopped domain** on its own: the
//! watch daemon writes running domains only (libvirt refuses its live write
//! once a domain stopped), and the post-stop store goes through here. An
//! explicit `virt-tpm-state store` of a stopped domain is an operator's
//! request and still writes it (after completing what is pending).
//!
//! It stores only while the kept final state is still the newest for the
//! domain ([`crate::decision::pending_decision`]): never over a metadata state
//! that moved since this host last synced, never twice (the lock serialises
//! the completers; the second finds the record gone or the metadata holding
//! the state already).

use super::{store_domain, StoreError, StoreOptions};
use crate::carried::carried;
use crate::carried::Running;
use crate::context::Ctx;
use crate::decision::{pending_decision, PendingAction, PendingDomain, PendingDrop, PendingInput};
use crate::domain::parse_domain;
use crate::format::read_header;
use crate::fs::HostData;
use crate::libvirt::{Libvirt, LibvirtError};
use crate::state::DomainUuid;
use std::time::Duration;

/// What completing one pending store did.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Completed {
    pub(crate) uuid: String,
    /// The domain's name, when libvirt still knows it.
    pub(crate) domain: Option<String>,
    /// "stored", "unchanged" (the metadata held it already) or "dropped".
    pub(crate) result: &'static str,
    /// The store's summary line, or why the record was dropped.
    pub(crate) detail: String,
}

/// A pending store that could not be completed now (it stays recorded).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Left {
    pub(crate) uuid: String,
    pub(crate) error: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Sweep {
    pub(crate) completed: Vec<Completed>,
    pub(crate) left: Vec<Left>,
    /// The first failure (what `sync` exits with).
    #[serde(skip)]
    pub(crate) first_error: Option<StoreError>,
}

/// Completes the pending store of `uuid` under its lock (waited for when
/// `wait`, else skipped while busy). `Ok(None)`: there is none (already
/// completed by someone else), or its lock was busy.
pub(crate) fn complete(
    ctx: &Ctx,
    lv: &Libvirt,
    uuid: &DomainUuid,
    wait: bool,
) -> Result<Option<Completed>, StoreError> {
    let host = HostData::new(&ctx.paths);
    let _lock = if wait {
        host.lock(uuid, Duration::from_secs(ctx.config.lock_timeout_secs))?
    } else {
        match host.try_lock(uuid) {
            Some(l) => l,
            None => return Ok(None),
        }
    };
    let Some(record) = host.read_pending(uuid)? else {
        return Ok(None);
    };
    let dom = match lv.domain(uuid.as_str()) {
        Ok(d) => Some(d),
        Err(LibvirtError::NoDomain(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut input = PendingInput {
        pending: record.digest,
        domain: None,
        local: None,
        metadata: None,
        journal: host.read_synced(uuid)?,
    };
    if let Some(dom) = &dom {
        // A stopped domain's XML is its definition (the config copy).
        let info = parse_domain(dom.xml()?.as_bytes(), &ctx.config.namespace)?;
        let c = carried(&ctx.paths, &ctx.config, &info)?;
        input.domain = Some(PendingDomain {
            active: dom.active,
            persistent: dom.persistent,
            carried: !c.is_empty(),
        });
        if !dom.active && !c.is_empty() {
            if host.has_intent(uuid)? {
                crate::restore::finish_intent(&ctx.paths, &host, &info, &c)?;
            }
            let max = ctx.config.max_file_size;
            let local = c.read_local(&host, uuid, (true, true), Running::No, max)?;
            input.local = local.map(|s| s.digest());
        }
        input.metadata = info
            .metadata
            .as_ref()
            .map(|el| read_header(el).map(|(_, d)| d).map_err(|_| ()));
    }
    let name = dom.as_ref().map(|d| d.name.as_str().to_owned());
    let shown = dom
        .as_ref()
        .map_or_else(|| uuid.to_string(), |d| d.name.to_string());
    let completed = match (pending_decision(&input), &dom) {
        (PendingAction::Store | PendingAction::AlreadyStored, Some(dom)) => {
            // The same store as `store`'s, with our lock held throughout:
            // it finds the metadata holding the state ("unchanged", J
            // recorded) or writes it as the next generation over M.
            let done = store_domain(
                ctx,
                dom,
                StoreOptions {
                    lock_held: true,
                    ..StoreOptions::default()
                },
            )?;
            log::info!("pending store completed: {}", done.line);
            Completed {
                uuid: uuid.to_string(),
                domain: name,
                result: done.result,
                detail: done.line,
            }
        }
        (PendingAction::Drop(why), _) => {
            let quiet = matches!(
                why,
                PendingDrop::Gone | PendingDrop::Running | PendingDrop::Transient
            );
            let line = format!(
                "VM {shown}: pending store of digest {} dropped: {}",
                record.digest.short(),
                why.describe()
            );
            if quiet {
                log::info!("{line}");
            } else {
                log::warn!("{line}");
            }
            Completed {
                uuid: uuid.to_string(),
                domain: name,
                result: "dropped",
                detail: line,
            }
        }
        (_, None) => unreachable!("a store decided for a domain libvirt does not know"),
    };
    host.clear_pending(uuid)?;
    Ok(Some(completed))
}

/// Completes every pending store on this host (see [`complete`] for
/// `wait`). A failure stays recorded for the next run; a lost connection
/// ends the sweep (what is not tried yet is not listed in `left`).
pub(crate) fn complete_all(ctx: &Ctx, lv: &Libvirt, wait: bool) -> Result<Sweep, StoreError> {
    let mut sweep = Sweep::default();
    for record in HostData::new(&ctx.paths).list_pending()? {
        match complete(ctx, lv, &record.uuid, wait) {
            Ok(Some(c)) => sweep.completed.push(c),
            Ok(None) => {}
            Err(e) => {
                log::warn!("pending store of domain {} not completed: {e}", record.uuid);
                sweep.left.push(Left {
                    uuid: record.uuid.to_string(),
                    error: e.to_string(),
                });
                sweep.first_error.get_or_insert(e);
                if !lv.is_alive() {
                    break;
                }
            }
        }
    }
    Ok(sweep)
}
