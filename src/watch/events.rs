//! What wakes the daemon: inotify on libvirt's directories and the state
//! dirs, the signalfd (SIGTERM/SIGINT stop, SIGHUP reloads), and libvirt's
//! from-snapshot lifecycle events (a `virsh event --loop` child).

use super::domain::begin_settle;
use super::{Daemon, WatchError, BACKOFF_MIN};
use crate::context::Ctx;
use crate::domain::parse_domain;
use crate::domain::DomainXmlError;
use crate::format::{read_header, FormatError};
use crate::fs::{FsError, HostData, RevertIntent};
use crate::libvirt::{DomainHandle, LibvirtError, RevertEvent, RevertEvents};
use crate::name::DomainName;
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags as WatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// libvirt's runtime dir: its sockets appear here when the daemon starts.
const RUN_LIBVIRT: &str = "/run/libvirt";
/// Status files of running QEMU domains.
const RUN_QEMU: &str = "/run/libvirt/qemu";
/// Persistent QEMU domain definitions.
const ETC_QEMU: &str = "/etc/libvirt/qemu";
/// Sockets whose appearance means libvirt is (back) up.
const SOCKETS: [&str; 2] = ["libvirt-sock", "virtqemud-sock"];
/// Debounce of domain-file events (libvirt rewrites a status file several
/// times while a domain starts).
const REFRESH_DELAY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StaticDir {
    RunLibvirt,
    RunQemu,
    EtcQemu,
}

impl StaticDir {
    pub(super) const ALL: [StaticDir; 3] = [
        StaticDir::RunLibvirt,
        StaticDir::RunQemu,
        StaticDir::EtcQemu,
    ];

    pub(super) fn path(self) -> &'static str {
        match self {
            StaticDir::RunLibvirt => RUN_LIBVIRT,
            StaticDir::RunQemu => RUN_QEMU,
            StaticDir::EtcQemu => ETC_QEMU,
        }
    }
}

pub(super) struct Notify {
    pub(super) fd: Inotify,
}

pub(super) struct Event {
    pub(super) wd: WatchDescriptor,
    flags: WatchFlags,
    pub(super) name: Option<String>,
}

impl Notify {
    pub(super) fn new() -> nix::Result<Self> {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(Notify { fd })
    }

    pub(super) fn add(&self, path: &Path, flags: WatchFlags) -> Result<WatchDescriptor, Errno> {
        self.fd.add_watch(path, flags)
    }

    pub(super) fn remove(&self, wd: WatchDescriptor) {
        let _ = self.fd.rm_watch(wd);
    }

    /// Every queued event (the fd is non-blocking: reads until EAGAIN).
    pub(super) fn drain(&mut self) -> Vec<Event> {
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

impl Daemon {
    /// Watches libvirt's directories, those that exist (the others are
    /// tried again at the next reconcile or when their parent reports them).
    pub(super) fn ensure_static_watches(&mut self) {
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

    pub(super) fn on_event(&mut self, ev: Event) {
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
                let name = w.name.as_str().to_string();
                self.refresh.insert(name, Instant::now() + REFRESH_DELAY);
            }
            return;
        }
        let Some(w) = self.doms.get_mut(&uuid) else {
            return;
        };
        if ev.name.as_deref() == Some(w.version.permall_name()) {
            log::debug!("VM {}: state file changed", w.name);
            begin_settle(w, Instant::now());
        }
    }

    /// Starts the lifecycle-event reader (again: it ends when libvirtd
    /// goes away). Without it only `snapshot revert` records reverts.
    pub(super) fn ensure_events(&mut self) {
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

    pub(super) fn read_revert_events(&mut self) {
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
        let shown = DomainName::from(name);
        let Some(lv) = self.libvirt() else { return };
        let dom = match lv.domain(name) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("VM {}: a snapshot revert event, but: {e}", shown);
                return;
            }
        };
        match kind {
            RevertEvent::Defined if !dom.active => {
                if let Err(e) = record_revert(&self.ctx, &dom) {
                    log::error!("VM {}: reverted to a snapshot, but {e}", shown);
                }
            }
            RevertEvent::Started => log::info!(
                "VM {} was started by a snapshot revert: a snapshot with memory resumes its own TPM state; after a disk-only one it runs with the TPM state it had before (to take the snapshot's: stop it and use `virt-tpm-state snapshot revert`)",
                shown
            ),
            _ => {}
        }
    }
}

/// Records a revert intent for the element a reverted, shut-off domain's
/// definition holds (unless `snapshot revert` recorded that one already).
fn record_revert(ctx: &Ctx, dom: &DomainHandle) -> Result<(), RevertError> {
    let name = dom.name.clone();
    let info = parse_domain(dom.xml()?.as_bytes(), &ctx.config.namespace)?;
    let Some(el) = &info.metadata else {
        return Ok(());
    };
    let (_, digest) = read_header(el).map_err(|source| RevertError::InvalidElement {
        name: name.clone(),
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
        name,
        DomainName::from(snapshot.as_str()),
        digest.short()
    );
    Ok(())
}

/// SIGTERM, SIGINT and SIGHUP, taken through a signalfd.
pub(super) struct Signals {
    pub(super) fd: SignalFd,
}

impl Signals {
    /// Blocks the three signals (the daemon is one thread) and opens the fd.
    pub(super) fn new() -> Result<Self, WatchError> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| WatchError::Setup(format!("cannot block signals: {e}")))?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| WatchError::Setup(format!("cannot create a signalfd: {e}")))?;
        Ok(Signals { fd })
    }

    /// Every queued signal: `(reload, stop)` (SIGHUP; SIGTERM or SIGINT).
    pub(super) fn read(&self) -> (bool, bool) {
        let (mut reload, mut stop) = (false, false);
        while let Ok(Some(info)) = self.fd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGHUP) => reload = true,
                Ok(s) => {
                    log::info!("{s}: stopping");
                    stop = true;
                }
                Err(_) => {}
            }
        }
        (reload, stop)
    }
}

/// Why a revert event could not be recorded (logged; the daemon goes on).
#[derive(Debug, thiserror::Error)]
pub(super) enum RevertError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("VM {name}: the TPM state element is invalid: {source}")]
    InvalidElement {
        name: DomainName,
        source: FormatError,
    },
}
