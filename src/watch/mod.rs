//! `watch`: the per-host daemon that keeps running VMs' metadata in step with
//! their TPM state, within seconds of a change and with no work at all while
//! nothing changes.
//!
//! Everything is event-driven, in one thread around one `poll(2)`:
//! - inotify on libvirt's own files finds domains: `/run/libvirt/qemu/<name>.xml`
//!   (status file: written while a domain starts or changes, removed when it
//!   stops), `/etc/libvirt/qemu/<name>.xml` (define, undefine, config writes),
//!   and `/run/libvirt` itself (the daemon's socket appears: libvirtd is back).
//!   An event names a domain; after a short debounce it is looked up once.
//! - inotify on each running domain's state dir (`IN_MOVED_TO` /
//!   `IN_CLOSE_WRITE` of the permall file: swtpm writes a temp file and
//!   renames it) starts the settle rule of `store`: the state is read at once
//!   and again `settle_interval_ms` later; when two reads agree it is stored
//!   through the very code of `store` ([`crate::store::store_domain`]).
//! - a signalfd delivers SIGTERM/SIGINT (stop after the current store) and
//!   SIGHUP (reload the config).
//! - timers: settle reads, the reconnect backoff while libvirt is away (1 s
//!   doubling to 60 s), and the full reconcile every `reconcile_interval_secs`
//!   (the safety net for anything inotify missed). Nothing else wakes it.
//!
//! The daemon's own stores are of running domains (a daemon write always
//! includes the live copy, so libvirt itself refuses it once the domain
//! stopped; see [`crate::store::StoreOptions::watch`]); a stopped domain's
//! final state goes through [`crate::store::pending`], which the daemon runs at
//! start, after every reconnect and at each reconcile, for the post-stop
//! stores that could not finish (libvirt was gone, the store was killed).
//!
//! It publishes what it knows (pending work, out of sync since when, last
//! error) in `/run/virt-tpm-state/status.json` for `status`, rewritten only
//! when that changes.
//!
//! One file per job: this one is the loop (timers, the connection, the
//! reconcile); `events` reads what wakes it (inotify, signals, libvirt's
//! from-snapshot events); `domain` is the per-domain work (watch, settle,
//! store); `status` is the status file. Nothing here comes from the CLI:
//! `virt-tpm-state watch` only calls [`watch`].

mod domain;
mod events;
mod status;

pub(crate) use status::{read_daemon_status, DaemonStatus};

use crate::config::Config;
use crate::context::Ctx;
use crate::fs::{FsError, HostData};
use crate::libvirt::{Libvirt, LibvirtError, RevertEvents};
use crate::name::DomainName;
use crate::state::DomainUuid;
use domain::Watched;
use events::{Notify, Signals, StaticDir};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::WatchDescriptor;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

/// The daemon collects garbage (`gc`) once a day.
const GC_INTERVAL: Duration = Duration::from_secs(86400);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why the daemon cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    /// Another daemon runs, or the process cannot set up its events
    /// (signals, inotify, poll): the usage exit code, as before.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Fs(#[from] FsError),
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The daemon's whole state.
struct Daemon {
    ctx: Ctx,
    notify: Notify,
    statics: Vec<(StaticDir, Option<WatchDescriptor>)>,
    doms: HashMap<DomainUuid, Watched>,
    by_wd: HashMap<WatchDescriptor, DomainUuid>,
    /// Domain names to look up, with when.
    refresh: HashMap<String, Instant>,
    lv: Option<Rc<Libvirt>>,
    outage: Option<(Instant, SystemTime)>,
    backoff: Duration,
    retry_at: Option<Instant>,
    reconcile_at: Instant,
    /// Next garbage collection (daily; the first with the first reconcile).
    gc_at: Instant,
    started: SystemTime,
    status_written: Option<String>,
    /// libvirt's lifecycle events (a `virsh event` child), while connected:
    /// a plain `virsh snapshot-revert` becomes a revert intent.
    events: Option<RevertEvents>,
}

/// One daemon per host: an exclusive lock on `/run/virt-tpm-state/watch.lock`,
/// held for the life of the process.
fn single_instance(ctx: &Ctx) -> Result<crate::fs::WatchLock, WatchError> {
    HostData::new(&ctx.paths).try_lock_watch()?.ok_or_else(|| {
        WatchError::Setup(format!(
            "another `virt-tpm-state watch` is running (it holds {})",
            ctx.paths.run_dir().join("watch.lock").display()
        ))
    })
}

/// `virt-tpm-state watch`: runs the daemon until SIGTERM or SIGINT.
pub(crate) fn watch(ctx: Ctx) -> Result<(), WatchError> {
    let _instance = single_instance(&ctx)?;
    let signals = Signals::new()?;
    let notify =
        Notify::new().map_err(|e| WatchError::Setup(format!("cannot initialise inotify: {e}")))?;
    let now = Instant::now();
    let mut d = Daemon {
        ctx,
        notify,
        statics: StaticDir::ALL.iter().map(|s| (*s, None)).collect(),
        doms: HashMap::new(),
        by_wd: HashMap::new(),
        refresh: HashMap::new(),
        lv: None,
        outage: None,
        backoff: BACKOFF_MIN,
        retry_at: None,
        reconcile_at: now,
        gc_at: now,
        started: SystemTime::now(),
        status_written: None,
        events: None,
    };
    log::info!(
        "watching {} (settle {} ms, full reconcile every {} s)",
        d.ctx.uri,
        d.ctx.config.settle_interval_ms,
        d.ctx.config.reconcile_interval_secs
    );
    d.ensure_static_watches();
    loop {
        // Rounded up to the next millisecond: rounding down would wake
        // just before the deadline and spin until it.
        let timeout = d.next_deadline().map_or(PollTimeout::NONE, |t| {
            let left = t.saturating_duration_since(Instant::now());
            let ms = left.as_nanos().div_ceil(1_000_000);
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        });
        let (sig_ready, ino_ready, events_ready) = {
            let mut fds = vec![
                PollFd::new(signals.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(d.notify.fd.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(ev) = &d.events {
                fds.push(PollFd::new(ev.fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(WatchError::Setup(format!("poll failed: {e}"))),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (
                ready(&fds[0]),
                ready(&fds[1]),
                fds.get(2).is_some_and(ready),
            )
        };
        if sig_ready {
            let (reload, stop) = signals.read();
            if reload {
                d.reload();
            }
            if stop {
                let pending = d.doms.values().filter(|w| w.settle.is_some()).count();
                if pending > 0 {
                    log::info!(
                        "{pending} change(s) not stored yet; the next start of the daemon (or the post-stop store) picks them up"
                    );
                }
                d.write_status();
                return Ok(());
            }
        }
        if ino_ready {
            for ev in d.notify.drain() {
                d.on_event(ev);
            }
        }
        if events_ready {
            d.read_revert_events();
        }
        d.run_timers();
        d.write_status();
    }
}

impl Daemon {
    fn next_deadline(&self) -> Option<Instant> {
        let mut t = Some(self.reconcile_at);
        let mut consider = |x: Instant| {
            t = Some(t.map_or(x, |y| y.min(x)));
        };
        if self.lv.is_none() {
            if let Some(r) = self.retry_at {
                consider(r);
            }
        }
        for due in self.refresh.values() {
            consider(*due);
        }
        for w in self.doms.values() {
            if let Some(s) = &w.settle {
                consider(s.due);
            }
        }
        t
    }

    fn reload(&mut self) {
        match Config::load(&self.ctx.paths) {
            Ok(c) => {
                let interval = Duration::from_secs(c.reconcile_interval_secs);
                self.reconcile_at = self.reconcile_at.min(Instant::now() + interval);
                self.ctx.config = c;
                log::info!(
                    "SIGHUP: configuration reloaded (settle {} ms, reconcile every {} s)",
                    self.ctx.config.settle_interval_ms,
                    self.ctx.config.reconcile_interval_secs
                );
            }
            Err(e) => log::error!("SIGHUP: {e}; keeping the previous configuration"),
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        if self.lv.is_none() && self.retry_at.is_some_and(|t| t <= now) {
            let _ = self.libvirt();
        }
        let due: Vec<String> = self
            .refresh
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if self.lv.is_none() && self.outage.is_some() {
                // Looked up again by the reconcile after libvirt is back.
                self.refresh.remove(&name);
                continue;
            }
            self.refresh.remove(&name);
            self.refresh_name(&name);
        }
        if self.reconcile_at <= Instant::now() {
            self.reconcile();
        }
        let due: Vec<DomainUuid> = self
            .doms
            .iter()
            .filter(|(_, w)| w.settle.as_ref().is_some_and(|s| s.due <= Instant::now()))
            .map(|(u, _)| u.clone())
            .collect();
        for uuid in due {
            self.settle_step(&uuid);
        }
    }

    /// The connection, (re)connecting when needed and allowed by the backoff.
    fn libvirt(&mut self) -> Option<Rc<Libvirt>> {
        if let Some(lv) = &self.lv {
            return Some(lv.clone());
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        match Libvirt::connect(&self.ctx.uri, false) {
            Ok(lv) => {
                if let Some((since, _)) = self.outage.take() {
                    log::warn!(
                        "libvirt reachable again after {} s; reconciling",
                        since.elapsed().as_secs()
                    );
                }
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                // Anything may have happened while we were not connected.
                self.reconcile_at = now;
                let lv = Rc::new(lv);
                self.lv = Some(lv.clone());
                self.ensure_events();
                Some(lv)
            }
            Err(e) => {
                if self.outage.is_none() {
                    log::warn!(
                        "libvirt unreachable ({e}); retrying quietly with backoff up to {} s",
                        BACKOFF_MAX.as_secs()
                    );
                    self.outage = Some((now, SystemTime::now()));
                }
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                None
            }
        }
    }

    /// After a failed call: drop a dead connection (reconnect at once).
    /// Returns true when the connection was lost.
    fn check_lost(&mut self, lv: &Libvirt) -> bool {
        if lv.is_alive() {
            return false;
        }
        log::debug!("the libvirt connection is gone; reconnecting");
        self.lv = None;
        // Reconnect at the next turn of the loop (and log the outage once
        // if that fails); the reconcile after reconnecting resumes the work.
        self.retry_at = Some(Instant::now());
        true
    }

    fn reconcile(&mut self) {
        let interval = Duration::from_secs(self.ctx.config.reconcile_interval_secs);
        self.reconcile_at = Instant::now() + interval;
        if self.gc_at <= Instant::now() {
            self.gc_at = Instant::now() + GC_INTERVAL;
            match crate::gc::run(&self.ctx.paths, &self.ctx.config, false, None) {
                Ok(r) => {
                    for x in &r.removed {
                        log::info!(
                            "gc: removed the data of domain {} ({} bytes, {} days old, {})",
                            x.uuid,
                            x.bytes,
                            x.age_days,
                            x.why
                        );
                    }
                }
                Err(e) => log::warn!("gc: {e}"),
            }
        }
        self.ensure_static_watches();
        let Some(lv) = self.libvirt() else { return };
        let handles = match lv.all_domains() {
            Ok(h) => h,
            Err(e) => {
                if !self.check_lost(&lv) {
                    log::warn!("cannot list domains: {e}");
                }
                // Try again soon rather than in a full interval.
                self.reconcile_at = Instant::now() + BACKOFF_MIN;
                return;
            }
        };
        // Post-stop stores that could not finish (libvirt stopped with the
        // host, say): the final states of stopped domains.
        match crate::store::pending::complete_all(&self.ctx, &lv, true) {
            Ok(sweep) if sweep.left.is_empty() => {}
            Ok(sweep) => {
                log::warn!(
                    "{} pending store(s) left for the next reconcile",
                    sweep.left.len()
                );
                if self.check_lost(&lv) {
                    self.reconcile_at = Instant::now() + BACKOFF_MIN;
                    return;
                }
            }
            Err(e) => log::warn!("pending stores: {e}"),
        }
        let mut running = Vec::new();
        for h in handles {
            if h.active {
                running.push(h.uuid.clone());
                self.refresh_handle(&lv, h);
            }
        }
        let gone: Vec<DomainUuid> = self
            .doms
            .keys()
            .filter(|u| !running.contains(u))
            .cloned()
            .collect();
        for u in gone {
            self.forget(&u);
        }
        log::debug!(
            "reconciled: {} running domain(s) with an emulated TPM watched",
            self.doms.len()
        );
    }

    fn refresh_name(&mut self, name: &str) {
        let Some(lv) = self.libvirt() else { return };
        match lv.domain(name) {
            Ok(h) => {
                if h.active {
                    self.refresh_handle(&lv, h);
                } else {
                    self.forget(&h.uuid);
                }
            }
            Err(LibvirtError::NoDomain(_)) => {
                let gone: Vec<DomainUuid> = self
                    .doms
                    .iter()
                    .filter(|(_, w)| w.name.as_str() == name)
                    .map(|(u, _)| u.clone())
                    .collect();
                for u in gone {
                    self.forget(&u);
                }
            }
            Err(e) => {
                if !self.check_lost(&lv) {
                    log::debug!("cannot look up domain {}: {e}", DomainName::from(name));
                }
            }
        }
    }
}
