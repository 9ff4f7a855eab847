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
//!   through the very code of `store` ([`super::store::store_domain`]).
//! - a signalfd delivers SIGTERM/SIGINT (stop after the current store) and
//!   SIGHUP (reload the config).
//! - timers: settle reads, the reconnect backoff while libvirt is away (1 s
//!   doubling to 60 s), and the full reconcile every `reconcile_interval_secs`
//!   (the safety net for anything inotify missed). Nothing else wakes it.
//!
//! The daemon's own stores are of running domains (a daemon write always
//! includes the live copy, so libvirt itself refuses it once the domain
//! stopped; see [`super::store::StoreOptions::watch`]); a stopped domain's
//! final state goes through [`super::pending`], which the daemon runs at
//! start, after every reconnect and at each reconcile, for the post-stop
//! stores that could not finish (libvirt was gone, the store was killed).
//!
//! It publishes what it knows (pending work, out of sync since when, last
//! error) in `/run/virt-tpm-state/status.json` for `status`, rewritten only
//! when that changes.

use super::store::{store_domain, StoreOptions};
use super::{CliError, Ctx};
use crate::config::Config;
use crate::domain::parse_domain;
use crate::format::{declared_digest, read_header};
use crate::fs::{HostData, RevertIntent, StateLocation};
use crate::libvirt::{DomainHandle, Libvirt, LibvirtError, RevertEvent, RevertEvents};
use crate::restore::{carried, domain_tpm_version, shown_name, state_location};
use crate::state::{DomainUuid, Sha256Sum, TpmState, TpmVersion};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags as WatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

/// libvirt's runtime dir: its sockets appear here when the daemon starts.
const RUN_LIBVIRT: &str = "/run/libvirt";
/// The daemon collects garbage (`gc`) once a day.
const GC_INTERVAL: Duration = Duration::from_secs(86400);
/// Status files of running QEMU domains.
const RUN_QEMU: &str = "/run/libvirt/qemu";
/// Persistent QEMU domain definitions.
const ETC_QEMU: &str = "/etc/libvirt/qemu";
/// Sockets whose appearance means libvirt is (back) up.
const SOCKETS: [&str; 2] = ["libvirt-sock", "virtqemud-sock"];
/// Debounce of domain-file events (libvirt rewrites a status file several
/// times while a domain starts).
const REFRESH_DELAY: Duration = Duration::from_millis(300);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Name of the daemon's status file in the run dir.
pub const STATUS_FILE: &str = "status.json";
/// The status file is a few hundred bytes per domain.
const STATUS_FILE_MAX: u64 = 64 * 1024 * 1024;

/// What `status` reads: the daemon's view, per domain UUID.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    /// RFC 3339, when this daemon started.
    pub started: String,
    /// `None` while connected; else RFC 3339 since when libvirt is unreachable.
    pub libvirt_unreachable_since: Option<String>,
    pub domains: BTreeMap<String, DomainStatus>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainStatus {
    pub name: String,
    /// A change seen and not stored yet (settling, or waiting for libvirt).
    pub pending: bool,
    /// RFC 3339: since when the local state is known to differ from the metadata.
    pub out_of_sync_since: Option<String>,
    pub last_error: Option<String>,
    /// RFC 3339 of the daemon's last store of this domain.
    pub last_stored: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StaticDir {
    RunLibvirt,
    RunQemu,
    EtcQemu,
}

impl StaticDir {
    const ALL: [StaticDir; 3] = [
        StaticDir::RunLibvirt,
        StaticDir::RunQemu,
        StaticDir::EtcQemu,
    ];

    fn path(self) -> &'static str {
        match self {
            StaticDir::RunLibvirt => RUN_LIBVIRT,
            StaticDir::RunQemu => RUN_QEMU,
            StaticDir::EtcQemu => ETC_QEMU,
        }
    }
}

/// The settle rule in progress for one domain.
#[derive(Debug)]
struct Settle {
    /// Digest of the previous read (`None`: none yet).
    prev: Option<Sha256Sum>,
    due: Instant,
    reads: u32,
    warned: bool,
}

/// A running domain with an emulated TPM.
struct Watched {
    name: String,
    version: TpmVersion,
    location: StateLocation,
    wd: Option<WatchDescriptor>,
    settle: Option<Settle>,
    status: DomainStatus,
    /// Looks left for a state dir that did not exist yet.
    dir_retries: u32,
}

struct Notify {
    fd: Inotify,
}

struct Event {
    wd: WatchDescriptor,
    flags: WatchFlags,
    name: Option<String>,
}

impl Notify {
    fn new() -> nix::Result<Self> {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(Notify { fd })
    }

    fn add(&self, path: &Path, flags: WatchFlags) -> Result<WatchDescriptor, Errno> {
        self.fd.add_watch(path, flags)
    }

    fn remove(&self, wd: WatchDescriptor) {
        let _ = self.fd.rm_watch(wd);
    }

    /// Every queued event (the fd is non-blocking: reads until EAGAIN).
    fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match self.fd.read_events() {
                Ok(events) => out.extend(events.into_iter().map(|e| Event {
                    wd: e.wd,
                    flags: e.mask,
                    name: e.name.map(|n| n.to_string_lossy().into_owned()),
                })),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        out
    }
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
fn single_instance(ctx: &Ctx) -> Result<crate::fs::WatchLock, CliError> {
    HostData::new(&ctx.paths).try_lock_watch()?.ok_or_else(|| {
        CliError::Usage(format!(
            "another `virt-tpm-state watch` is running (it holds {})",
            ctx.paths.run_dir().join("watch.lock").display()
        ))
    })
}

pub fn watch(ctx: Ctx) -> Result<(), CliError> {
    let _instance = single_instance(&ctx)?;
    // Signals are taken through a signalfd: block them first (one thread).
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| CliError::Usage(format!("cannot block signals: {e}")))?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| CliError::Usage(format!("cannot create a signalfd: {e}")))?;
    let notify =
        Notify::new().map_err(|e| CliError::Usage(format!("cannot initialise inotify: {e}")))?;
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
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(d.notify.fd.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(ev) = &d.events {
                fds.push(PollFd::new(ev.fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(CliError::Usage(format!("poll failed: {e}"))),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (
                ready(&fds[0]),
                ready(&fds[1]),
                fds.get(2).is_some_and(ready),
            )
        };
        if sig_ready {
            let mut stop = false;
            while let Ok(Some(info)) = sfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => d.reload(),
                    Ok(s) => {
                        log::info!("{s}: stopping");
                        stop = true;
                    }
                    Err(_) => {}
                }
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

    /// Watches libvirt's directories, those that exist (the others are
    /// tried again at the next reconcile or when their parent reports them).
    fn ensure_static_watches(&mut self) {
        let mask = WatchFlags::IN_CREATE
            | WatchFlags::IN_DELETE
            | WatchFlags::IN_MOVED_TO
            | WatchFlags::IN_MOVED_FROM
            | WatchFlags::IN_CLOSE_WRITE
            | WatchFlags::IN_ONLYDIR;
        for i in 0..self.statics.len() {
            let (kind, wd) = self.statics[i];
            if wd.is_some() {
                continue;
            }
            match self.notify.add(Path::new(kind.path()), mask) {
                Ok(wd) => self.statics[i].1 = Some(wd),
                Err(e) => log::debug!("cannot watch {} yet: {e}", kind.path()),
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        if ev.flags.contains(WatchFlags::IN_Q_OVERFLOW) {
            log::warn!("inotify queue overflowed; reconciling everything");
            self.reconcile_at = Instant::now();
            return;
        }
        if let Some(i) = self.statics.iter().position(|(_, wd)| *wd == Some(ev.wd)) {
            let kind = self.statics[i].0;
            if ev.flags.contains(WatchFlags::IN_IGNORED) {
                // The directory went away (libvirt's runtime dir on a restart).
                self.statics[i].1 = None;
                return;
            }
            let Some(name) = ev.name else { return };
            match kind {
                StaticDir::RunLibvirt => {
                    if name == "qemu" {
                        self.ensure_static_watches();
                        self.reconcile_at = Instant::now();
                    } else if SOCKETS.contains(&name.as_str())
                        && ev
                            .flags
                            .intersects(WatchFlags::IN_CREATE | WatchFlags::IN_MOVED_TO)
                    {
                        // libvirt is (back) up: reconnect now, not at the
                        // end of the backoff; a stale connection is dropped.
                        if let Some(lv) = &self.lv {
                            if !lv.is_alive() {
                                self.lv = None;
                            }
                        }
                        self.retry_at = Some(Instant::now() + Duration::from_millis(500));
                        self.backoff = BACKOFF_MIN;
                    }
                }
                StaticDir::RunQemu | StaticDir::EtcQemu => {
                    if let Some(dom) = name.strip_suffix(".xml") {
                        if !dom.is_empty() {
                            self.refresh
                                .entry(dom.to_string())
                                .or_insert_with(|| Instant::now() + REFRESH_DELAY);
                        }
                    }
                }
            }
            return;
        }
        let Some(uuid) = self.by_wd.get(&ev.wd).cloned() else {
            return;
        };
        if ev.flags.contains(WatchFlags::IN_IGNORED) {
            // The state dir is gone (the domain stopped and libvirt removed
            // it, or it was undefined): look the domain up again.
            self.by_wd.remove(&ev.wd);
            if let Some(w) = self.doms.get_mut(&uuid) {
                w.wd = None;
                let name = w.name.clone();
                self.refresh.insert(name, Instant::now() + REFRESH_DELAY);
            }
            return;
        }
        let Some(w) = self.doms.get_mut(&uuid) else {
            return;
        };
        if ev.name.as_deref() == Some(w.version.permall_name()) {
            log::debug!("VM {}: state file changed", shown_name(&w.name));
            begin_settle(w, Instant::now());
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

    /// Starts the lifecycle-event reader (again: it ends when libvirtd
    /// goes away). Without it only `snapshot revert` records reverts.
    fn ensure_events(&mut self) {
        if self.events.is_some() {
            return;
        }
        match RevertEvents::spawn(&self.ctx.uri) {
            Ok(ev) => self.events = Some(ev),
            Err(e) => log::warn!(
                "cannot run `virsh event` ({e}); a plain `virsh snapshot-revert` will not be seen (use `virt-tpm-state snapshot revert`)"
            ),
        }
    }

    fn read_revert_events(&mut self) {
        let Some(ev) = self.events.as_mut() else {
            return;
        };
        let (events, alive) = ev.read();
        if !alive {
            self.events = None;
        }
        for (name, kind) in events {
            self.on_revert_event(&name, kind);
        }
    }

    /// A from-snapshot lifecycle event. A domain shut off with the
    /// snapshot's definition (`DEFINED_FROM_SNAPSHOT`, still inactive) gets
    /// a revert intent for the element that definition holds, so its next
    /// start takes the snapshot's TPM state and VARS. A domain the revert
    /// left running was started within the revert (before any event): a
    /// memory snapshot resumes its own TPM state from the vmstate, a
    /// disk-only one started with the local state; nothing can change that
    /// without a restart, so it is said, not fixed.
    fn on_revert_event(&mut self, name: &str, kind: RevertEvent) {
        let Some(lv) = self.libvirt() else { return };
        let dom = match lv.domain(name) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("VM {}: a snapshot revert event, but: {e}", shown_name(name));
                return;
            }
        };
        match kind {
            RevertEvent::Defined if !dom.active => {
                if let Err(e) = record_revert(&self.ctx, &dom) {
                    log::error!("VM {}: reverted to a snapshot, but {e}", shown_name(name));
                }
            }
            RevertEvent::Started => log::info!(
                "VM {} was started by a snapshot revert: a snapshot with memory resumes its own TPM state; after a disk-only one it runs with the TPM state it had before (to take the snapshot's: stop it and use `virt-tpm-state snapshot revert`)",
                shown_name(name)
            ),
            _ => {}
        }
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
        match super::pending::complete_all(&self.ctx, &lv, true) {
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
                    .filter(|(_, w)| w.name == name)
                    .map(|(u, _)| u.clone())
                    .collect();
                for u in gone {
                    self.forget(&u);
                }
            }
            Err(e) => {
                if !self.check_lost(&lv) {
                    log::debug!("cannot look up domain {}: {e}", shown_name(name));
                }
            }
        }
    }

    /// A running domain: (re)establish its watch, and start the settle rule
    /// when its local state differs from what its metadata holds.
    fn refresh_handle(&mut self, lv: &Libvirt, h: DomainHandle) {
        let ns = self.ctx.config.namespace.clone();
        let info = match h.xml().map(|x| parse_domain(x.as_bytes(), &ns)) {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                log::debug!("VM {}: unreadable XML: {e}", shown_name(&h.name));
                return;
            }
            Err(e) => {
                if !self.check_lost(lv) && !matches!(e, LibvirtError::NoDomain(_)) {
                    log::debug!("VM {}: {e}", shown_name(&h.name));
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
                    log::warn!("VM {}: {e}", shown_name(&h.name));
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
            name: h.name.clone(),
            version,
            location: location.clone(),
            wd: None,
            settle: None,
            status: DomainStatus {
                name: h.name.clone(),
                ..DomainStatus::default()
            },
            dir_retries: 0,
        });
        entry.name = h.name.clone();
        entry.status.name = h.name.clone();
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
                    log::info!(
                        "VM {}: watching {}",
                        shown_name(&h.name),
                        location.path().display()
                    );
                }
                Err(Errno::ENOENT) if entry.dir_retries < 5 => {
                    // Started a moment ago: libvirt creates the dir soon.
                    entry.dir_retries += 1;
                    self.refresh
                        .insert(h.name.clone(), Instant::now() + Duration::from_secs(2));
                }
                Err(e) => {
                    log::warn!(
                        "VM {}: cannot watch {}: {e}; relying on the periodic reconcile",
                        shown_name(&h.name),
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
                log::debug!("VM {}: {e}", shown_name(&h.name));
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
                log::debug!("VM {}: {e}", shown_name(&h.name));
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
                shown_name(&h.name),
                local.short()
            );
            begin_settle(entry, Instant::now());
        } else if live_ok && config_ok {
            entry.status.out_of_sync_since = None;
        }
    }

    fn forget(&mut self, uuid: &DomainUuid) {
        if let Some(w) = self.doms.remove(uuid) {
            if let Some(wd) = w.wd {
                self.notify.remove(wd);
                self.by_wd.remove(&wd);
            }
            log::info!(
                "VM {}: no longer running here; not watched (a stop is stored by the post-stop store)",
                shown_name(&w.name)
            );
        }
    }

    /// One step of the settle rule: read; two equal reads in a row store.
    fn settle_step(&mut self, uuid: &DomainUuid) {
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
                    shown_name(&w.name),
                    attempts,
                    interval.as_millis()
                );
            }
            return;
        }
        self.store(uuid, state);
    }

    fn store(&mut self, uuid: &DomainUuid, state: TpmState) {
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
                        shown_name(&dom.name)
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

    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            started: rfc3339(self.started),
            libvirt_unreachable_since: self.outage.map(|(_, t)| rfc3339(t)),
            domains: self
                .doms
                .iter()
                .map(|(u, w)| {
                    let mut s = w.status.clone();
                    s.pending = w.settle.is_some();
                    (u.to_string(), s)
                })
                .collect(),
        }
    }

    /// Publishes the status for `status`, only when it changed.
    fn write_status(&mut self) {
        let text = serde_json::to_string_pretty(&self.status()).expect("serializable") + "\n";
        if self.status_written.as_deref() == Some(text.as_str()) {
            return;
        }
        let res = HostData::new(&self.ctx.paths).write_run_file(STATUS_FILE, text.as_bytes());
        match res {
            Ok(()) => self.status_written = Some(text),
            Err(e) => {
                // Not retried until the status changes again: no error loop.
                log::warn!("cannot write the status file: {e}");
                self.status_written = Some(text);
            }
        }
    }
}

/// Starts (or restarts) the settle rule: first read right away.
/// Records a revert intent for the element a reverted, shut-off domain's
/// definition holds (unless `snapshot revert` recorded that one already).
fn record_revert(ctx: &Ctx, dom: &DomainHandle) -> Result<(), CliError> {
    let info = parse_domain(dom.xml()?.as_bytes(), &ctx.config.namespace)?;
    let Some(el) = &info.metadata else {
        return Ok(());
    };
    let (_, digest) = read_header(el).map_err(|source| CliError::InvalidElement {
        context: format!("VM {}", shown_name(&dom.name)),
        source,
    })?;
    let host = HostData::new(&ctx.paths);
    if host
        .read_revert(&dom.uuid)?
        .is_some_and(|r| r.digest == digest)
    {
        return Ok(());
    }
    let snapshot = dom.current_snapshot_name().unwrap_or_default();
    host.write_revert(
        &dom.uuid,
        &RevertIntent {
            digest,
            snapshot: snapshot.clone(),
            by: "watch".into(),
        },
    )?;
    log::info!(
        "VM {}: reverted to snapshot {} (libvirt event); its next start restores the snapshot's TPM state (element {}) and backs up the current one",
        shown_name(&dom.name),
        shown_name(&snapshot),
        digest.short()
    );
    Ok(())
}

fn begin_settle(w: &mut Watched, now: Instant) {
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

/// The `digest` attribute of the domain's element (not validated).
/// Reads the daemon's status file, if a live daemon wrote it.
pub fn read_daemon_status(ctx: &Ctx) -> Option<DaemonStatus> {
    let text = HostData::new(&ctx.paths)
        .read_run_file(STATUS_FILE, STATUS_FILE_MAX)
        .ok()??;
    let s: DaemonStatus = serde_json::from_slice(&text).ok()?;
    // Signal 0: only whether the pid exists.
    let alive = i32::try_from(s.pid).is_ok_and(|pid| {
        pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    });
    let ours = std::fs::read_to_string(format!("/proc/{}/cmdline", s.pid))
        .is_ok_and(|c| c.split('\0').any(|a| a == "watch"));
    (alive && ours).then_some(s)
}
