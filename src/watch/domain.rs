//! The per-domain work: a running domain's watch on its state dir, the
//! settle rule (two equal reads a settle interval apart), and the store
//! through [`crate::store::store_domain`].

use super::status::DomainStatus;
use super::{rfc3339, Daemon};
use crate::carried::{carried, domain_tpm_version, state_location};
use crate::domain::parse_domain;
use crate::format::{declared_digest, read_header};
use crate::fs::StateLocation;
use crate::libvirt::{DomainHandle, Libvirt, LibvirtError};
use crate::name::DomainName;
use crate::state::{DomainUuid, Sha256Sum, TpmState, TpmVersion};
use crate::store::{store_domain, StoreOptions};
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags as WatchFlags, WatchDescriptor};
use std::time::{Duration, Instant, SystemTime};

/// The settle rule in progress for one domain.
#[derive(Debug)]
pub(super) struct Settle {
    /// Digest of the previous read (`None`: none yet).
    prev: Option<Sha256Sum>,
    pub(super) due: Instant,
    reads: u32,
    warned: bool,
}

/// A running domain with an emulated TPM.
pub(super) struct Watched {
    pub(super) name: DomainName,
    pub(super) version: TpmVersion,
    location: StateLocation,
    pub(super) wd: Option<WatchDescriptor>,
    pub(super) settle: Option<Settle>,
    pub(super) status: DomainStatus,
    /// Looks left for a state dir that did not exist yet.
    dir_retries: u32,
}

impl Daemon {
    /// A running domain: (re)establish its watch, and start the settle rule
    /// when its local state differs from what its metadata holds.
    pub(super) fn refresh_handle(&mut self, lv: &Libvirt, h: DomainHandle) {
        let name = h.name.clone();
        let ns = self.ctx.config.namespace.clone();
        let info = match h.xml().map(|x| parse_domain(x.as_bytes(), &ns)) {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                log::debug!("VM {}: unreadable XML: {e}", name);
                return;
            }
            Err(e) => {
                if !self.check_lost(lv) && !matches!(e, LibvirtError::NoDomain(_)) {
                    log::debug!("VM {}: {e}", name);
                }
                return;
            }
        };
        let version = match domain_tpm_version(&info) {
            Ok(Some(v)) => v,
            _ => {
                self.forget(&h.uuid);
                return;
            }
        };
        let location = match state_location(&self.ctx.paths, &self.ctx.config, &info, version) {
            Ok(l) => l,
            Err(e) => {
                let w = self.doms.get(&h.uuid);
                if w.and_then(|w| w.status.last_error.as_deref()) != Some(&e.to_string()) {
                    log::warn!("VM {}: {e}", name);
                }
                return;
            }
        };
        let config_info = if h.persistent {
            match h.inactive_xml().map(|x| parse_domain(x.as_bytes(), &ns)) {
                Ok(Ok(i)) => Some(Some(i)),
                _ => Some(None),
            }
        } else {
            None
        };
        // Keep the entry (and its pending state) when nothing moved.
        let entry = self.doms.entry(h.uuid.clone()).or_insert_with(|| Watched {
            name: name.clone(),
            version,
            location: location.clone(),
            wd: None,
            settle: None,
            status: DomainStatus {
                name: h.name.as_str().to_owned(),
                ..DomainStatus::default()
            },
            dir_retries: 0,
        });
        entry.name = name.clone();
        entry.status.name = h.name.as_str().to_owned();
        entry.version = version;
        if entry.location != location {
            if let Some(wd) = entry.wd.take() {
                self.notify.remove(wd);
                self.by_wd.remove(&wd);
            }
            entry.location = location.clone();
        }
        // swtpm writes a <source type='file'> state in place through mmap,
        // which inotify does not report: such a domain is kept in sync by
        // the periodic reconcile alone.
        if entry.wd.is_none() && !location.is_file() {
            let mask = WatchFlags::IN_MOVED_TO
                | WatchFlags::IN_CLOSE_WRITE
                | WatchFlags::IN_ONLYDIR
                | WatchFlags::IN_DONT_FOLLOW;
            match self.notify.add(&location.path(), mask) {
                Ok(wd) => {
                    entry.wd = Some(wd);
                    entry.dir_retries = 0;
                    self.by_wd.insert(wd, h.uuid.clone());
                    log::info!("VM {}: watching {}", name, location.path().display());
                }
                Err(Errno::ENOENT) if entry.dir_retries < 5 => {
                    // Started a moment ago: libvirt creates the dir soon.
                    entry.dir_retries += 1;
                    self.refresh.insert(
                        h.name.as_str().to_owned(),
                        Instant::now() + Duration::from_secs(2),
                    );
                }
                Err(e) => {
                    log::warn!(
                        "VM {}: cannot watch {}: {e}; relying on the periodic reconcile",
                        name,
                        location.path().display()
                    );
                }
            }
        }
        // Compare the local state with the metadata (cheap: attributes only;
        // the store validates everything before it writes).
        // Everything the element carries for this domain (the TPM and, for
        // UEFI domains, the VARS file): the digest `store` would write.
        let carried_now = match carried(&self.ctx.paths, &self.ctx.config, &info) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("VM {}: {e}", name);
                return;
            }
        };
        // Over the sections the domain carries here (one rule with `show`
        // and `status`: `Carried::sections`).
        let (tpm, nvram) = carried_now.sections();
        let declared = |i: &crate::domain::DomainInfo| {
            i.metadata
                .as_ref()
                .filter(|el| read_header(el).is_ok())
                .and_then(|el| declared_digest(el, tpm, nvram))
        };
        let live_digest = declared(&info);
        let config_digest = config_info.as_ref().map(|c| c.as_ref().and_then(declared));
        let local = match carried_now.read_live(tpm, nvram, self.ctx.config.max_file_size) {
            Ok(Some(s)) => s.digest(),
            Ok(None) => return,
            Err(e) => {
                log::debug!("VM {}: {e}", name);
                return;
            }
        };
        let live_ok = live_digest == Some(local);
        let config_ok = config_digest.map_or(true, |c| c == Some(local));
        if !(live_ok && config_ok) && entry.settle.is_none() {
            if entry.status.out_of_sync_since.is_none() {
                let since = location.modified(version).unwrap_or_else(SystemTime::now);
                entry.status.out_of_sync_since = Some(rfc3339(since));
            }
            log::debug!(
                "VM {}: local state {} is not in the metadata; settling",
                name,
                local.short()
            );
            begin_settle(entry, Instant::now());
        } else if live_ok && config_ok {
            entry.status.out_of_sync_since = None;
        }
    }

    pub(super) fn forget(&mut self, uuid: &DomainUuid) {
        if let Some(w) = self.doms.remove(uuid) {
            if let Some(wd) = w.wd {
                self.notify.remove(wd);
                self.by_wd.remove(&wd);
            }
            log::info!(
                "VM {}: no longer running here; not watched (a stop is stored by the post-stop store)",
                w.name
            );
        }
    }

    /// One step of the settle rule: read; two equal reads in a row store.
    pub(super) fn settle_step(&mut self, uuid: &DomainUuid) {
        let interval = Duration::from_millis(self.ctx.config.settle_interval_ms);
        let attempts = self.ctx.config.settle_attempts;
        let max = self.ctx.config.max_file_size;
        let Some(w) = self.doms.get_mut(uuid) else {
            return;
        };
        let state = match w.location.read(w.version, max) {
            Ok(Some(s)) => s,
            Ok(None) => {
                w.settle = None;
                return;
            }
            Err(e) => {
                note_error(w, &e.to_string());
                w.settle = None;
                return;
            }
        };
        let digest = state.digest();
        let s = w.settle.as_mut().expect("settling");
        if s.prev != Some(digest) {
            s.prev = Some(digest);
            s.reads += 1;
            s.due = Instant::now() + interval;
            if s.reads > attempts && !s.warned {
                s.warned = true;
                log::warn!(
                    "VM {}: the TPM state is still changing after {} reads {} ms apart; storing once it settles",
                    w.name,
                    attempts,
                    interval.as_millis()
                );
            }
            return;
        }
        self.store(uuid, state);
    }

    pub(super) fn store(&mut self, uuid: &DomainUuid, state: TpmState) {
        let Some(lv) = self.libvirt() else {
            // Stays out of sync; the reconcile after reconnecting resumes it.
            if let Some(w) = self.doms.get_mut(uuid) {
                w.settle = None;
            }
            return;
        };
        let mut dom = match lv.domain(uuid.as_str()) {
            Ok(d) => d,
            Err(LibvirtError::NoDomain(_)) => {
                self.forget(uuid);
                return;
            }
            Err(e) => {
                if !self.check_lost(&lv) {
                    if let Some(w) = self.doms.get_mut(uuid) {
                        note_error(w, &e.to_string());
                    }
                }
                if let Some(w) = self.doms.get_mut(uuid) {
                    w.settle = None;
                }
                return;
            }
        };
        if !dom.active {
            self.forget(uuid);
            return;
        }
        let res = store_domain(
            &self.ctx,
            &dom,
            StoreOptions {
                settled: Some(state),
                watch: true,
                ..StoreOptions::default()
            },
        );
        match res {
            Ok(done) => {
                let Some(w) = self.doms.get_mut(uuid) else {
                    return;
                };
                w.settle = None;
                w.status.out_of_sync_since = None;
                w.status.last_error = None;
                if done.result == "stored" {
                    w.status.last_stored = Some(rfc3339(SystemTime::now()));
                    log::info!("{}", done.line);
                } else {
                    log::debug!("{}", done.line);
                }
            }
            Err(e) => {
                let lost = self.check_lost(&lv);
                let stopped = !lost && dom.refresh().is_ok_and(|()| !dom.active);
                if stopped {
                    log::info!(
                        "VM {}: stopped while its state was stored; the post-stop store has the final state",
                        dom.name.clone()
                    );
                    self.forget(uuid);
                    return;
                }
                if let Some(w) = self.doms.get_mut(uuid) {
                    w.settle = None;
                    if !lost {
                        note_error(w, &e.to_string());
                    }
                }
            }
        }
    }
}

/// Starts (or restarts) the settle rule: first read right away.
pub(super) fn begin_settle(w: &mut Watched, now: Instant) {
    if w.settle.is_none() {
        w.settle = Some(Settle {
            prev: None,
            due: now,
            reads: 0,
            warned: false,
        });
        if w.status.out_of_sync_since.is_none() {
            w.status.out_of_sync_since = Some(rfc3339(SystemTime::now()));
        }
    }
}

/// Logs an error once per distinct message per domain (no error loops).
fn note_error(w: &mut Watched, msg: &str) {
    if w.status.last_error.as_deref() != Some(msg) {
        log::error!("{msg}");
        w.status.last_error = Some(msg.to_string());
    }
}
