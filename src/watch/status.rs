//! The daemon's status file (`/run/virt-tpm-state/status.json`): what it
//! knows, for `status`; rewritten only when that changes.

use super::{rfc3339, Daemon};
use crate::context::Ctx;
use crate::fs::HostData;
use std::collections::BTreeMap;

/// Name of the daemon's status file in the run dir.
pub(crate) const STATUS_FILE: &str = "status.json";
/// The status file is a few hundred bytes per domain.
const STATUS_FILE_MAX: u64 = 64 * 1024 * 1024;

/// What `status` reads: the daemon's view, per domain UUID.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DaemonStatus {
    pub(crate) pid: u32,
    /// RFC 3339, when this daemon started.
    pub(crate) started: String,
    /// `None` while connected; else RFC 3339 since when libvirt is unreachable.
    pub(crate) libvirt_unreachable_since: Option<String>,
    pub(crate) domains: BTreeMap<String, DomainStatus>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DomainStatus {
    pub(crate) name: String,
    /// A change seen and not stored yet (settling, or waiting for libvirt).
    pub(crate) pending: bool,
    /// RFC 3339: since when the local state is known to differ from the metadata.
    pub(crate) out_of_sync_since: Option<String>,
    pub(crate) last_error: Option<String>,
    /// RFC 3339 of the daemon's last store of this domain.
    pub(crate) last_stored: Option<String>,
}

impl Daemon {
    pub(super) fn status(&self) -> DaemonStatus {
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
    pub(super) fn write_status(&mut self) {
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

/// Reads the daemon's status file, if a live daemon wrote it.
pub(crate) fn read_daemon_status(ctx: &Ctx) -> Option<DaemonStatus> {
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
