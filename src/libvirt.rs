//! The only module that speaks to libvirt (through the `virt` crate). Used by
//! the CLI alone: the hook must never call libvirt, and does not link it.

use crate::format::NAMESPACE_PREFIX;
use crate::state::DomainUuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// The URI used when neither `-c` nor `LIBVIRT_DEFAULT_URI` says otherwise.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}; is libvirtd (or virtqemud) running, and are you root?")]
    Connect { uri: String, message: String },
    #[error("no domain named or with UUID {0:?} (virsh list --all shows them)")]
    NoDomain(String),
    #[error("libvirt refused to change domain {domain}: {message}; a read-only connection cannot store, use a read-write one (as root)")]
    Denied { domain: String, message: String },
    #[error("libvirt: {action} of domain {domain} failed: {message}")]
    Call {
        action: &'static str,
        domain: String,
        message: String,
    },
}

impl LibvirtError {
    fn call(action: &'static str, domain: &str, e: virt::error::Error) -> Self {
        match e.code().known() {
            Some(ErrorNumber::NoDomain) => LibvirtError::NoDomain(domain.to_string()),
            Some(ErrorNumber::OperationDenied) => LibvirtError::Denied {
                domain: domain.to_string(),
                message: e.message().to_string(),
            },
            _ => LibvirtError::Call {
                action,
                domain: domain.to_string(),
                message: e.message().to_string(),
            },
        }
    }
}

pub struct Libvirt {
    conn: Connect,
    uri: String,
}

/// A domain looked up by name or UUID, with the facts `store` needs.
pub struct DomainHandle {
    dom: Domain,
    pub name: String,
    pub uuid: DomainUuid,
    pub active: bool,
    pub persistent: bool,
}

/// Which copy of the definition a metadata write affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub live: bool,
    pub config: bool,
}

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

    pub fn any(self) -> bool {
        self.live || self.config
    }
}

impl Libvirt {
    pub fn connect(uri: &str, read_only: bool) -> Result<Self, LibvirtError> {
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

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the connection still works (false once libvirtd went away).
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// Looks a domain up by UUID (when the argument is one) or by name.
    pub fn domain(&self, name_or_uuid: &str) -> Result<DomainHandle, LibvirtError> {
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
            domain: name.clone(),
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
            name,
            uuid,
            active,
            persistent,
        })
    }

    /// UUIDs of every domain libvirt knows (running or defined).
    pub fn all_domains(&self) -> Result<Vec<DomainHandle>, LibvirtError> {
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
    pub fn refresh(&mut self) -> Result<(), LibvirtError> {
        self.active = self
            .dom
            .is_active()
            .map_err(|e| LibvirtError::call("get state", &self.name, e))?;
        Ok(())
    }

    /// The live definition (for a running domain) or the only one.
    pub fn xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(0)
            .map_err(|e| LibvirtError::call("dumpxml", &self.name, e))
    }

    /// The persistent definition (`dumpxml --inactive`).
    pub fn inactive_xml(&self) -> Result<String, LibvirtError> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| LibvirtError::call("dumpxml --inactive", &self.name, e))
    }

    /// Writes our state element (`virDomainSetMetadata`, type ELEMENT) into
    /// namespace `namespace`, replacing the previous one. `element` carries
    /// no `xmlns`: libvirt adds it, with our fixed prefix.
    pub fn write_state_element(
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
            .map_err(|e| LibvirtError::call("set metadata", &self.name, e))
    }
}
