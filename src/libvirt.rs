//! The only module that speaks to libvirt (through the `virt` crate). Used by
//! the CLI alone: the hook must never call libvirt, and does not link it.

use crate::format::NAMESPACE_PREFIX;
use crate::name::DomainName;
use crate::state::DomainUuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// The URI used when neither `-c` nor `LIBVIRT_DEFAULT_URI` says otherwise.
pub(crate) const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, thiserror::Error)]
pub(crate) enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}; is libvirtd (or virtqemud) running, and are you root?")]
    Connect { uri: String, message: String },
    #[error("no domain named or with UUID {0:?} (virsh list --all shows them)")]
    NoDomain(String),
    #[error("libvirt refused to change domain {domain}: {message}; a read-only connection cannot store, use a read-write one (as root)")]
    Denied { domain: DomainName, message: String },
    #[error("libvirt: {action} of domain {domain} failed: {message}")]
    Call {
        action: &'static str,
        domain: DomainName,
        message: String,
    },
}

impl LibvirtError {
    fn call(action: &'static str, domain: &str, e: virt::error::Error) -> Self {
        match e.code().known() {
            Some(ErrorNumber::NoDomain) => LibvirtError::NoDomain(domain.to_string()),
            Some(ErrorNumber::OperationDenied) => LibvirtError::Denied {
                domain: domain.into(),
                message: e.message().to_string(),
            },
            _ => LibvirtError::Call {
                action,
                domain: domain.into(),
                message: e.message().to_string(),
            },
        }
    }
}

pub(crate) struct Libvirt {
    conn: Connect,
    uri: String,
}

/// A domain looked up by name or UUID, with the facts `store` needs.
pub(crate) struct DomainHandle {
    dom: Domain,
    /// Attached here, where the name enters from libvirt.
    pub(crate) name: DomainName,
    pub(crate) uuid: DomainUuid,
    pub(crate) active: bool,
    pub(crate) persistent: bool,
}

/// Which copy of the definition a metadata write affects (decided by the
/// pure store plan).
use crate::store::plan::Targets;

impl Targets {
    fn flags(self) -> u32 {
        let mut f = 0;
        if self.live {
            f |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if self.config {
            f |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        f
    }
}

impl Libvirt {
    pub(crate) fn connect(uri: &str, read_only: bool) -> Result<Self, LibvirtError> {
        // libvirt prints every error to stderr by default; ours carry the
        // message already, in one line.
        virt::error::clear_error_callback();
        let conn = if read_only {
            Connect::open_read_only(Some(uri))
        } else {
            Connect::open(Some(uri))
        }
        .map_err(|e| LibvirtError::Connect {
            uri: uri.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
        })
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the connection still works (false once libvirtd went away).
    pub(crate) fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Looks a domain up by UUID (when the argument is one) or by name.
    pub(crate) fn domain(&self, name_or_uuid: &str) -> Result<DomainHandle, LibvirtError> {
        let by_uuid = DomainUuid::parse(name_or_uuid)
            .and_then(|u| self.conn.lookup_domain_by_uuid_string(u.as_str()).ok());
        let dom = match by_uuid {
            Some(d) => d,
            None => self
                .conn
                .lookup_domain_by_name(name_or_uuid)
                .map_err(|e| LibvirtError::call("lookup", name_or_uuid, e))?,
        };
        Self::handle(dom, name_or_uuid)
    }

    /// A handle on a domain object libvirt gave us (`name_or_uuid`: how the
    /// caller named it, for errors).
    fn handle(dom: Domain, name_or_uuid: &str) -> Result<DomainHandle, LibvirtError> {
        let name = dom
            .name()
            .map_err(|e| LibvirtError::call("get name", name_or_uuid, e))?;
        let uuid_text = dom
            .uuid_string()
            .map_err(|e| LibvirtError::call("get uuid", &name, e))?;
        let uuid = DomainUuid::parse(&uuid_text).ok_or_else(|| LibvirtError::Call {
            action: "get uuid",
            domain: name.as_str().into(),
            message: "libvirt returned a malformed UUID".into(),
        })?;
        let active = dom
            .is_active()
            .map_err(|e| LibvirtError::call("get state", &name, e))?;
        let persistent = dom
            .is_persistent()
            .map_err(|e| LibvirtError::call("get state", &name, e))?;
        Ok(DomainHandle {
            dom,
            name: name.into(),
            uuid,
            active,
            persistent,
        })
    }

    /// UUIDs of every domain libvirt knows (running or defined).
    pub(crate) fn all_domains(&self) -> Result<Vec<DomainHandle>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| LibvirtError::call("list", "*", e))?;
        // The listed objects themselves: looking each up again by UUID cost
        // one more round trip per domain (docs/BENCHMARKS.md, "Scale").
        // One that vanished meanwhile is skipped.
        Ok(doms
            .into_iter()
            .filter_map(|d| Self::handle(d, "*").ok())
            .collect())
    }
}

impl DomainHandle {
    /// Refreshes `active` (the domain may have stopped since the lookup).
    pub(crate) fn refresh(&mut self) -> Result<(), LibvirtError> {
        self.active = self
            .dom
            .is_active()
            .map_err(|e| LibvirtError::call("get state", self.name.as_str(), e))?;
        Ok(())
    }

    /// The live definition (for a running domain) or the only one.
    pub(crate) fn xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(0)
            .map_err(|e| LibvirtError::call("dumpxml", self.name.as_str(), e))
    }

    /// The persistent definition (`dumpxml --inactive`).
    pub(crate) fn inactive_xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| LibvirtError::call("dumpxml --inactive", self.name.as_str(), e))
    }

    /// The XML of snapshot `name` (`virDomainSnapshotGetXMLDesc`): the
    /// `<domainsnapshot>` with the definition it was taken with inside.
    pub(crate) fn snapshot_xml(&self, name: &str) -> Result<String, LibvirtError> {
        let snap = Domain::lookup_snapshot_by_name(&self.dom, name, 0).map_err(|e| {
            LibvirtError::Call {
                action: "snapshot lookup",
                domain: self.name.clone(),
                message: e.message().to_string(),
            }
        })?;
        snap.xml_desc(0)
            .map_err(|e| LibvirtError::call("snapshot-dumpxml", self.name.as_str(), e))
    }

    /// Whether the domain is shut off because a snapshot revert stopped it
    /// or put it there (libvirt's shutoff reason `from snapshot`).
    pub(crate) fn shut_off_by_revert(&self) -> Result<bool, LibvirtError> {
        use virt::domain::{DomainShutoffReason, DomainStateReason};
        use virt::enumutil::Enum;
        let (_, reason) = self
            .dom
            .state()
            .map_err(|e| LibvirtError::call("get state", self.name.as_str(), e))?;
        Ok(matches!(
            reason,
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(
                DomainShutoffReason::FromSnapshot
            )))
        ))
    }

    /// The name of the domain's current snapshot (the one a revert made
    /// current), if it has one.
    pub(crate) fn current_snapshot_name(&self) -> Option<String> {
        self.dom.current_snapshot(0).ok()?.name().ok()
    }

    /// Pauses a running domain (`virsh suspend`).
    pub(crate) fn suspend(&self) -> Result<(), LibvirtError> {
        self.dom
            .suspend()
            .map_err(|e| LibvirtError::call("suspend", self.name.as_str(), e))
    }

    /// Resumes a paused domain (`virsh resume`).
    pub(crate) fn resume(&self) -> Result<(), LibvirtError> {
        self.dom
            .resume()
            .map_err(|e| LibvirtError::call("resume", self.name.as_str(), e))
    }

    /// Whether the domain is paused (`virsh domstate` says "paused").
    pub(crate) fn is_paused(&self) -> Result<bool, LibvirtError> {
        let (state, _) = self
            .dom
            .state()
            .map_err(|e| LibvirtError::call("get state", self.name.as_str(), e))?;
        Ok(state.to_raw() == sys::VIR_DOMAIN_PAUSED)
    }

    /// Writes our state element (`virDomainSetMetadata`, type ELEMENT) into
    /// namespace `namespace`, replacing the previous one. `element` carries
    /// no `xmlns`: libvirt adds it, with our fixed prefix.
    pub(crate) fn write_state_element(
        &self,
        element: &str,
        namespace: &str,
        targets: Targets,
    ) -> Result<(), LibvirtError> {
        self.dom
            .set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(element),
                Some(NAMESPACE_PREFIX),
                Some(namespace),
                targets.flags(),
            )
            .map_err(|e| LibvirtError::call("set metadata", self.name.as_str(), e))
    }
}

/// Runs `virsh -c URI WORDS... EXTRA...` with the caller's stdio: the
/// snapshot drop-ins hand libvirt's own options and messages through
/// unchanged.
pub(crate) fn virsh(
    uri: &str,
    domain: &DomainName,
    action: &'static str,
    words: &[&str],
    extra: &[String],
) -> Result<(), LibvirtError> {
    let status = std::process::Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(words)
        .args(extra)
        .status()
        .map_err(|e| LibvirtError::Call {
            action,
            domain: domain.clone(),
            message: format!("cannot run virsh: {e}"),
        })?;
    if status.success() {
        return Ok(());
    }
    Err(LibvirtError::Call {
        action,
        domain: domain.clone(),
        message: format!("virsh {action} exited with {status} (its message is above)"),
    })
}

/// A lifecycle event libvirt sends for a snapshot revert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RevertEvent {
    /// `DEFINED_FROM_SNAPSHOT`: the definition is now the snapshot's.
    Defined,
    /// `STARTED_FROM_SNAPSHOT`: the revert started the domain.
    Started,
    /// `STOPPED_FROM_SNAPSHOT`: the revert stopped the running domain.
    Stopped,
}

/// Reads one line of `virsh event --loop --event lifecycle`, e.g.
/// `event 'lifecycle' for domain 'vm1': Defined Snapshot`: the domain name
/// and the from-snapshot event, or `None` for any other line.
pub(crate) fn parse_revert_event(line: &str) -> Option<(String, RevertEvent)> {
    let rest = line.strip_prefix("event 'lifecycle' for domain '")?;
    [
        ("': Defined Snapshot", RevertEvent::Defined),
        ("': Started Snapshot", RevertEvent::Started),
        ("': Stopped Snapshot", RevertEvent::Stopped),
    ]
    .into_iter()
    .find_map(|(suffix, kind)| rest.strip_suffix(suffix).map(|n| (n.to_string(), kind)))
}

/// libvirt's lifecycle events, from a `virsh event --loop` child: the `virt`
/// crate has domain events only as raw C callbacks, and this crate has no
/// unsafe code. Poll [`RevertEvents::fd`]; [`RevertEvents::read`] returns the
/// from-snapshot events that arrived. The child is killed on drop.
pub(crate) struct RevertEvents {
    child: std::process::Child,
    out: std::process::ChildStdout,
    partial: Vec<u8>,
}

impl RevertEvents {
    pub(crate) fn spawn(uri: &str) -> std::io::Result<RevertEvents> {
        use std::process::{Command, Stdio};
        let mut child = Command::new("virsh")
            .args(["-c", uri, "event", "--loop", "--event", "lifecycle"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let flags = OFlag::from_bits_truncate(fcntl(&out, FcntlArg::F_GETFL)?);
            fcntl(&out, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        Ok(RevertEvents {
            child,
            out,
            partial: Vec::new(),
        })
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.out.as_fd()
    }

    /// The from-snapshot events read so far, and whether virsh still runs
    /// (false: it exited, e.g. libvirtd went away; spawn another).
    pub(crate) fn read(&mut self) -> (Vec<(String, RevertEvent)>, bool) {
        use std::io::Read;
        let mut alive = true;
        let mut buf = [0u8; 4096];
        loop {
            match self.out.read(&mut buf) {
                Ok(0) => {
                    alive = false;
                    break;
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        let mut events = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Some(e) = parse_revert_event(String::from_utf8_lossy(&line).trim_end()) {
                events.push(e);
            }
        }
        // A line never ends: keep memory bounded.
        if self.partial.len() > 64 * 1024 {
            self.partial.clear();
        }
        (events, alive)
    }
}

impl Drop for RevertEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_snapshot_events_are_read_from_virsh_lines() {
        assert_eq!(
            parse_revert_event("event 'lifecycle' for domain 'vm1': Defined Snapshot"),
            Some(("vm1".into(), RevertEvent::Defined))
        );
        assert_eq!(
            parse_revert_event("event 'lifecycle' for domain 'a': b': Stopped Snapshot"),
            Some(("a': b".into(), RevertEvent::Stopped))
        );
        assert_eq!(
            parse_revert_event("event 'lifecycle' for domain 'vm1': Started Snapshot"),
            Some(("vm1".into(), RevertEvent::Started))
        );
        for other in [
            "event 'lifecycle' for domain 'vm1': Started Booted",
            "event 'lifecycle' for domain 'vm1': Stopped Destroyed",
            "event 'metadata-change' for domain 'vm1': type element, uri urn:virt-tpm-state:1",
            "",
        ] {
            assert_eq!(parse_revert_event(other), None, "{other:?}");
        }
    }
}
