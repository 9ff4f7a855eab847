//! Reading the domain XML libvirt hands the hook (or `dumpxml` prints):
//! uuid, name, the `<tpm>` device, the `<os>` firmware facts and our
//! `<metadata>` element, found by namespace URI whatever its prefix. Pure:
//! bytes in, facts out.
//!
//! The bytes are hostile; `crate::xml` reads them (bounds, forbidden
//! characters, namespaces, errors that quote nothing). This module only
//! says which elements carry which field (`FIELDS`, a path -> handler
//! table), and never turns the name or uuid into a path: callers get a
//! validated [`DomainUuid`].

use crate::name::DomainName;
use crate::state::{DomainUuid, TpmVersion};
use crate::xml::XmlElement;
use crate::xml::{
    describe, find, malformed_at, Node, Reader, Start, XmlError, MAX_ATTRIBUTES, MAX_DEPTH,
    MAX_NAMESPACES_IN_SCOPE,
};
use quick_xml::events::Event;

/// Most elements kept from our metadata subtree (state, tpm, a few files).
const MAX_KEPT_ELEMENTS: usize = 64;

/// Backend of a `<tpm>` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TpmBackend {
    /// swtpm run by libvirt: the only kind with state for us to carry.
    Emulator {
        /// `version` attribute; libvirt's default when absent depends on the
        /// model, so `None` is kept as is and resolved by [`TpmDevice::version`].
        version: Option<String>,
        /// `<source type=... path=...>` (libvirt >= 10.10).
        source: Option<TpmSource>,
        /// `<encryption secret=...>`: swtpm encrypts its own state.
        encryption_secret: Option<String>,
    },
    Passthrough,
    External,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TpmSource {
    pub(crate) kind: String,
    pub(crate) path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TpmDevice {
    pub(crate) model: Option<String>,
    pub(crate) backend: TpmBackend,
}

impl TpmDevice {
    /// The TPM version libvirt will run on a guest of architecture `arch`
    /// (`<os><type arch=…>`; absent = x86, libvirt's default here). Without
    /// a `version` attribute libvirt (qemuDomainTPMDefPostParse) picks 1.2
    /// only for tpm-tis on x86 (the model defaults to tpm-spapr on ppc64,
    /// tpm-tis elsewhere) and 2.0 otherwise; it writes the attribute back
    /// into the XML, so it is usually there.
    pub(crate) fn version_on(&self, arch: Option<&str>) -> Option<Result<TpmVersion, String>> {
        let x86 = arch.map_or(true, |a| matches!(a, "x86_64" | "i686"));
        let ppc64 = arch.is_some_and(|a| a.starts_with("ppc64"));
        match &self.backend {
            TpmBackend::Emulator { version, .. } => Some(match version.as_deref() {
                Some(v) => TpmVersion::parse(v).ok_or_else(|| v.to_string()),
                None => {
                    let tis = match self.model.as_deref() {
                        Some(m) => m == "tpm-tis",
                        None => !ppc64,
                    };
                    if tis && x86 {
                        Ok(TpmVersion::V1_2)
                    } else {
                        Ok(TpmVersion::V2_0)
                    }
                }
            }),
            _ => None,
        }
    }
}

/// The firmware facts of `<os>` that decide whether the domain has a UEFI
/// variable store (NVRAM) and where.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OsFirmware {
    /// `<os firmware='efi'>` (firmware autoselection).
    pub(crate) efi: bool,
    /// `<loader type='pflash'>`.
    pub(crate) pflash: bool,
    /// `<loader stateless='yes'>`: no variable store at all.
    pub(crate) stateless: bool,
    /// `<nvram>`, if present: its `type` attribute and its path (the text,
    /// or `<source file=...>` for `type='file'`).
    pub(crate) nvram: Option<NvramElement>,
    /// `<os><type arch=…>`: decides libvirt's default TPM version.
    pub(crate) arch: Option<String>,
    /// `<varstore>` (libvirt >= 12.1, QEMU's uefi-vars device): its `path`
    /// attribute, empty when absent (libvirt fills in its default).
    pub(crate) varstore: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NvramElement {
    pub(crate) kind: Option<String>,
    /// `<source file=…>`, if any.
    pub(crate) path: String,
    /// The element's own text (CDATA included), exactly as written.
    pub(crate) text: String,
}

/// Where a domain keeps its UEFI variable store, as the XML says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvramSpec {
    /// UEFI without a path in the XML: libvirt's default,
    /// `/var/lib/libvirt/qemu/nvram/<name>_VARS.fd` (the XML of `prepare`
    /// with firmware autoselection has no path yet).
    Default,
    /// `<nvram>PATH</nvram>` or `<nvram type='file'><source file=PATH/>`:
    /// not validated yet.
    Path(String),
    /// `<nvram type='network'|'block'|...>`: not a file this tool carries.
    Unsupported(String),
}

impl OsFirmware {
    /// The variable store the domain has, if any.
    pub fn nvram(&self) -> Option<NvramSpec> {
        if self.stateless {
            return None;
        }
        if let Some(n) = &self.nvram {
            match n.kind.as_deref() {
                None | Some("file") => {}
                Some(other) => return Some(NvramSpec::Unsupported(other.to_string())),
            }
            // `<source file=…>`, else the element's text as libvirt reads
            // it: not trimmed (` /p ` is not an absolute path, and is
            // refused as one). Text that is only whitespace (the
            // indentation around a `<source>`) names no path.
            if !n.path.is_empty() {
                return Some(NvramSpec::Path(n.path.clone()));
            }
            if !n
                .text
                .chars()
                .all(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
            {
                return Some(NvramSpec::Path(n.text.clone()));
            }
        }
        (self.efi || self.pflash || self.nvram.is_some()).then_some(NvramSpec::Default)
    }
}

impl OsFirmware {
    /// The domain's `<varstore>`, if it has one: libvirt's default
    /// `/var/lib/libvirt/qemu/varstore/<name>.json`, or its `path`. A domain
    /// with a `<varstore>` has no `<nvram>` (libvirt refuses both), so this
    /// takes precedence over [`Self::nvram`].
    pub(crate) fn varstore(&self) -> Option<NvramSpec> {
        if self.stateless {
            return None;
        }
        self.varstore.as_ref().map(|p| {
            if p.is_empty() {
                NvramSpec::Default
            } else {
                NvramSpec::Path(p.clone())
            }
        })
    }
}

/// What the tool needs from a domain XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Attached here, where the name enters: every message shows it escaped.
    pub name: DomainName,
    pub(crate) uuid: DomainUuid,
    pub(crate) tpms: Vec<TpmDevice>,
    /// `<os>`: UEFI firmware and its variable store.
    pub os: OsFirmware,
    /// Our element (namespace [`crate::format::NAMESPACE_URI`]), if present.
    pub metadata: Option<XmlElement>,
}

impl DomainInfo {
    /// The emulated TPM, if the domain has one.
    pub(crate) fn emulated_tpm(&self) -> Option<&TpmDevice> {
        self.tpms
            .iter()
            .find(|t| matches!(t.backend, TpmBackend::Emulator { .. }))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainXmlError {
    #[error("domain XML is not well-formed: {0}")]
    Malformed(String),
    #[error("domain XML contains a DOCTYPE; libvirt never writes one, refusing it")]
    Doctype,
    #[error("domain XML nests deeper than {MAX_DEPTH} elements")]
    TooDeep,
    #[error("the root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("domain XML has no <uuid>")]
    MissingUuid,
    #[error("domain XML has no <name>")]
    MissingName,
    #[error("domain <uuid> is not a UUID")]
    BadUuid,
    #[error("<metadata> holds {0} elements in namespace {1}; expected at most one")]
    DuplicateMetadata(usize, String),
    #[error("the virt-tpm-state metadata element is too large or too deeply structured")]
    MetadataTooComplex,
    #[error("domain XML declares more than {MAX_NAMESPACES_IN_SCOPE} XML namespaces in one scope; libvirt never writes that many")]
    TooManyNamespaces,
    #[error("element <{0}> of the domain XML has more than {MAX_ATTRIBUTES} attributes; libvirt never writes that many")]
    TooManyAttributes(String),
}

/// The reader's refusals, in the words a domain XML's reader uses.
impl From<XmlError> for DomainXmlError {
    fn from(e: XmlError) -> Self {
        match e {
            XmlError::Malformed(m) => DomainXmlError::Malformed(m),
            XmlError::Doctype => DomainXmlError::Doctype,
            XmlError::TooDeep => DomainXmlError::TooDeep,
            XmlError::WrongRoot(name) => DomainXmlError::NotADomain(name),
            XmlError::TooManyNamespaces => DomainXmlError::TooManyNamespaces,
            XmlError::TooManyAttributes(name) => DomainXmlError::TooManyAttributes(name),
            XmlError::SubtreeTooLarge => DomainXmlError::MetadataTooComplex,
        }
    }
}

/// What a snapshot XML (`<domainsnapshot>`, what
/// `virDomainSnapshotGetXMLDesc` returns) says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SnapshotXml<'a> {
    /// The `<domain>` it embeds, as its bytes (`None`: it holds no
    /// definition): a domain XML of its own (libvirt declares our namespace
    /// on our element), read by [`parse_domain`] like any other.
    pub(crate) domain: Option<&'a [u8]>,
    /// `<creationTime>`, seconds since the epoch.
    pub(crate) created: Option<i64>,
    /// `<state>`: the domain's state when taken (`running`, `shutoff`,
    /// `disk-snapshot`, …).
    pub(crate) state: Option<String>,
}

/// Reads a snapshot XML: its embedded `<domain>`, creation time and state.
pub(crate) fn parse_snapshot(xml: &[u8]) -> Result<SnapshotXml<'_>, DomainXmlError> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut depth = 0usize;
    let mut out = SnapshotXml::default();
    let mut domain_start = None;
    let mut text_of: Option<&'static str> = None;
    loop {
        let here = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| malformed_at(xml, here, describe(&e)))?;
        match event {
            Event::DocType(_) => return Err(DomainXmlError::Doctype),
            Event::Start(e) => {
                let name = e.local_name();
                if depth == 0 && name.as_ref() != b"domainsnapshot" {
                    return Err(DomainXmlError::Malformed(
                        "the root element is not <domainsnapshot>".into(),
                    ));
                }
                if depth == 1 {
                    match name.as_ref() {
                        b"domain" => domain_start = Some(here),
                        b"creationTime" => text_of = Some("created"),
                        b"state" => text_of = Some("state"),
                        _ => {}
                    }
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(DomainXmlError::TooDeep);
                }
            }
            Event::Text(t) => {
                let text = String::from_utf8_lossy(t.as_ref()).trim().to_string();
                match text_of {
                    Some("created") => out.created = text.parse().ok(),
                    Some("state") => out.state = Some(text),
                    _ => {}
                }
            }
            Event::End(_) => {
                text_of = None;
                depth = depth.saturating_sub(1);
                if depth == 1 {
                    if let Some(from) = domain_start.take() {
                        let to = reader.buffer_position();
                        let range = usize::try_from(from).unwrap_or(usize::MAX)
                            ..usize::try_from(to).unwrap_or(usize::MAX);
                        out.domain = xml.get(range);
                    }
                }
                if depth == 0 {
                    return Ok(out);
                }
            }
            Event::Eof => {
                return Err(DomainXmlError::Malformed(
                    "the snapshot XML ends inside an element".into(),
                ))
            }
            _ => {}
        }
    }
}

/// Reads a domain XML. `namespace` is the URI of our element (configurable,
/// normally [`crate::format::NAMESPACE_URI`]).
pub fn parse_domain(xml: &[u8], namespace: &str) -> Result<DomainInfo, DomainXmlError> {
    let once: Vec<&str> = FIELDS.iter().filter(|f| f.once).map(|f| f.path).collect();
    let mut reader = Reader::new(xml, "domain", &once)?;
    let mut found = Found::default();
    let mut metadata: Vec<XmlElement> = Vec::new();
    let mut budget = MAX_KEPT_ELEMENTS;
    // Where text goes: set by the element that wants it, until the next
    // end tag (so text after a child element is not its parent's).
    let mut text: Option<TextSlot> = None;
    while let Some(node) = reader.read()? {
        match node {
            Node::Start(start) => {
                let path = reader.path();
                // MUST (FORMAT.md): find the element by namespace URI, never by prefix.
                let ours = start.namespace.as_deref() == Some(namespace);
                if ours && path.rsplit_once('/').map(|(p, _)| p) == Some("domain/metadata") {
                    metadata.push(reader.keep(start, &mut budget)?);
                    text = None;
                } else if let Some(field) = FIELDS.iter().find(|f| f.at(path)) {
                    if let Some(slot) = (field.read)(&mut found, &start)? {
                        text = Some(slot);
                    }
                }
            }
            Node::Text(t) => match text {
                Some(TextSlot::Name) => found.name.get_or_insert_with(String::new).push_str(&t),
                Some(TextSlot::Uuid) => found.uuid.get_or_insert_with(String::new).push_str(&t),
                Some(TextSlot::Nvram) => {
                    if let Some(n) = found.os.nvram.as_mut() {
                        n.text.push_str(&t);
                    }
                }
                None => {}
            },
            Node::End => text = None,
        }
    }
    // MUST (FORMAT.md): refuse a domain XML with two elements of the
    // namespace in `<metadata>`.
    if metadata.len() > 1 {
        return Err(DomainXmlError::DuplicateMetadata(
            metadata.len(),
            namespace.to_string(),
        ));
    }
    let uuid_text = found.uuid.ok_or(DomainXmlError::MissingUuid)?;
    let uuid = DomainUuid::parse(&uuid_text).ok_or(DomainXmlError::BadUuid)?;
    // libvirt takes the name as written (no trimming); its own check
    // refuses the odd ones, and `NvramLocation` validates it before use.
    let name = found
        .name
        .filter(|n| !n.is_empty())
        .ok_or(DomainXmlError::MissingName)?;
    Ok(DomainInfo {
        name: DomainName::new(name),
        uuid,
        tpms: found.tpms,
        os: found.os,
        metadata: metadata.pop(),
    })
}

/// The fields read so far (name and uuid as their raw text).
#[derive(Default)]
struct Found {
    name: Option<String>,
    uuid: Option<String>,
    tpms: Vec<TpmDevice>,
    os: OsFirmware,
}

/// Which field an element's text goes to, as libvirt reads it: all the
/// text of the element, CDATA included, nothing trimmed here.
#[derive(Clone, Copy)]
enum TextSlot {
    Name,
    Uuid,
    Nvram,
}

/// An element libvirt reads, by its path of local names.
struct Field {
    path: &'static str,
    /// libvirt reads the element once: a second one is refused, not merged.
    once: bool,
    /// Takes the element's attributes into the fields; says where its text
    /// goes, if anywhere.
    read: fn(&mut Found, &Start<'_>) -> Result<Option<TextSlot>, XmlError>,
}

/// Every element this module reads (our metadata element aside: it is
/// kept whole, see [`parse_domain`]). Attributes are parsed, and bounded,
/// only for these elements: any other may carry any number.
const FIELDS: &[Field] = &[
    Field {
        path: "domain/name",
        once: true,
        read: |_, _| Ok(Some(TextSlot::Name)),
    },
    Field {
        path: "domain/uuid",
        once: true,
        read: |_, _| Ok(Some(TextSlot::Uuid)),
    },
    Field {
        path: "domain/metadata",
        once: true,
        read: |_, _| Ok(None),
    },
    Field {
        path: "domain/os",
        once: true,
        read: |f, e| {
            f.os.efi = find(&e.attributes()?, "firmware") == Some("efi");
            Ok(None)
        },
    },
    Field {
        path: "domain/os/type",
        once: false,
        read: |f, e| {
            f.os.arch = find(&e.attributes()?, "arch").map(str::to_string);
            Ok(None)
        },
    },
    Field {
        path: "domain/os/loader",
        once: true,
        read: |f, e| {
            let attrs = e.attributes()?;
            f.os.pflash = find(&attrs, "type") == Some("pflash");
            f.os.stateless = find(&attrs, "stateless") == Some("yes");
            Ok(None)
        },
    },
    Field {
        path: "domain/os/nvram",
        once: true,
        read: |f, e| {
            f.os.nvram = Some(NvramElement {
                kind: find(&e.attributes()?, "type").map(str::to_string),
                ..Default::default()
            });
            Ok(Some(TextSlot::Nvram))
        },
    },
    Field {
        path: "domain/os/nvram/source",
        once: false,
        read: |f, e| {
            let attrs = e.attributes()?;
            if let (Some(n), Some(file)) = (f.os.nvram.as_mut(), find(&attrs, "file")) {
                n.path = file.to_string();
            }
            Ok(None)
        },
    },
    Field {
        path: "domain/os/varstore",
        once: true,
        read: |f, e| {
            let path = find(&e.attributes()?, "path").map(str::to_string);
            f.os.varstore = Some(path.unwrap_or_default());
            Ok(None)
        },
    },
    Field {
        path: "domain/devices/tpm",
        once: false,
        read: |f, e| {
            f.tpms.push(TpmDevice {
                model: find(&e.attributes()?, "model").map(str::to_string),
                backend: TpmBackend::Other(String::new()),
            });
            Ok(None)
        },
    },
    Field {
        path: "domain/devices/tpm/backend",
        once: false,
        read: tpm_backend,
    },
    Field {
        path: "domain/devices/tpm/backend/*",
        once: false,
        read: tpm_backend_child,
    },
];

impl Field {
    /// Whether the element at `path` is this one (`*`: any child).
    fn at(&self, path: &str) -> bool {
        match self.path.strip_suffix("/*") {
            Some(parent) => path.rsplit_once('/').map(|(p, _)| p) == Some(parent),
            None => self.path == path,
        }
    }
}

/// `<backend type=…>` of the last `<tpm>`.
fn tpm_backend(f: &mut Found, e: &Start<'_>) -> Result<Option<TextSlot>, XmlError> {
    let attrs = e.attributes()?;
    let attr = |k| find(&attrs, k).map(str::to_string);
    if let Some(t) = f.tpms.last_mut() {
        t.backend = match find(&attrs, "type") {
            Some("emulator") => TpmBackend::Emulator {
                version: attr("version"),
                source: None,
                encryption_secret: None,
            },
            Some("passthrough") => TpmBackend::Passthrough,
            Some("external") => TpmBackend::External,
            other => TpmBackend::Other(other.unwrap_or("").to_string()),
        };
    }
    Ok(None)
}

/// `<source>` and `<encryption>` of an emulator backend (the attributes of
/// any child are read, and so checked, as they always were).
fn tpm_backend_child(f: &mut Found, e: &Start<'_>) -> Result<Option<TextSlot>, XmlError> {
    let attrs = e.attributes()?;
    let attr = |k| find(&attrs, k).map(str::to_string);
    if let Some(TpmDevice {
        backend:
            TpmBackend::Emulator {
                source,
                encryption_secret,
                ..
            },
        ..
    }) = f.tpms.last_mut()
    {
        if e.name == "source" {
            *source = Some(TpmSource {
                kind: attr("type").unwrap_or_default(),
                path: attr("path").unwrap_or_default(),
            });
        } else if e.name == "encryption" {
            *encryption_secret = attr("secret");
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "urn:virt-tpm-state:1";

    fn domain(inner: &str) -> String {
        format!(
            "<domain type='kvm'><name>vm1</name><uuid>6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d</uuid>{inner}</domain>"
        )
    }

    #[test]
    fn reads_uuid_name_and_tpm() {
        let xml = domain(
            "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'>\
             <encryption secret='abc'/><source type='dir' path='/srv/tpm'/></backend></tpm></devices>",
        );
        let d = parse_domain(xml.as_bytes(), NS).unwrap();
        assert_eq!(d.name.as_str(), "vm1");
        assert_eq!(d.uuid.as_str(), "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d");
        let t = d.emulated_tpm().unwrap();
        assert_eq!(t.model.as_deref(), Some("tpm-crb"));
        assert_eq!(t.version_on(None), Some(Ok(TpmVersion::V2_0)));
        match &t.backend {
            TpmBackend::Emulator {
                source,
                encryption_secret,
                ..
            } => {
                assert_eq!(encryption_secret.as_deref(), Some("abc"));
                assert_eq!(
                    source,
                    &Some(TpmSource {
                        kind: "dir".into(),
                        path: "/srv/tpm".into()
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(d.metadata.is_none());
    }

    #[test]
    fn finds_metadata_by_namespace_not_prefix() {
        for prefix in ["vts", "other", ""] {
            let (open, close) = if prefix.is_empty() {
                (
                    format!("<state xmlns='{NS}' format='1'>"),
                    "</state>".to_string(),
                )
            } else {
                (
                    format!("<{prefix}:state xmlns:{prefix}='{NS}' format='1'>"),
                    format!("</{prefix}:state>"),
                )
            };
            let xml = domain(&format!(
                "<metadata><app:x xmlns:app='urn:other'>y</app:x>{open}<tpm version='2.0'><file name='a'> QUJD\n </file></tpm>{close}</metadata>"
            ));
            let d = parse_domain(xml.as_bytes(), NS).unwrap();
            let m = d.metadata.expect("found");
            assert_eq!(m.name, "state");
            assert_eq!(m.attr("format"), Some("1"));
            assert_eq!(m.children[0].children[0].text, " QUJD\n ");
        }
    }

    #[test]
    fn same_prefix_other_namespace_is_not_ours() {
        let xml = domain("<metadata><vts:state xmlns:vts='urn:not-ours' format='1'/></metadata>");
        assert!(parse_domain(xml.as_bytes(), NS).unwrap().metadata.is_none());
    }

    #[test]
    fn refuses_doctype_and_entities() {
        let bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><domain><name>&lol2;</name></domain>";
        assert_eq!(
            parse_domain(bomb.as_bytes(), NS),
            Err(DomainXmlError::Doctype)
        );
        let undefined_entity = domain("<description>&xxe;</description>");
        // Text outside what we keep is still unescaped only if needed; an
        // undefined entity in a kept element must fail.
        let kept = domain(&format!(
            "<metadata><vts:state xmlns:vts='{NS}'>&xxe;</vts:state></metadata>"
        ));
        assert!(parse_domain(kept.as_bytes(), NS).is_err());
        let _ = parse_domain(undefined_entity.as_bytes(), NS);
    }

    #[test]
    fn refuses_deep_nesting() {
        let xml = domain(&format!("{}{}", "<a>".repeat(100), "</a>".repeat(100)));
        assert_eq!(
            parse_domain(xml.as_bytes(), NS),
            Err(DomainXmlError::TooDeep)
        );
    }

    /// Runs `f` on its own thread and fails if it has not returned after a
    /// minute: a hang detector for inputs that used to take time quadratic
    /// in their size (each now takes milliseconds, so the deadline is
    /// thousands of times the expected time and cannot flake).
    fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("parse_domain hung (quadratic work on a hostile input?)")
    }

    #[test]
    fn many_attributes_are_refused_in_linear_time() {
        // Regression: quick-xml's duplicate check and ours compared each
        // attribute with all earlier ones; 1e6 attributes on our element or
        // on <os> kept the hook busy for over an hour.
        let attrs = |n: usize| -> String { (0..n).map(|i| format!(" a{i}=''")).collect() };
        for (el, name) in [
            (
                format!(
                    "<metadata><vts:state xmlns:vts='{NS}'{}/></metadata>",
                    attrs(200_000)
                ),
                "state",
            ),
            (format!("<os{}/>", attrs(200_000)), "os"),
        ] {
            let xml = domain(&el);
            let r = finishes(move || parse_domain(xml.as_bytes(), NS).map(|_| ()));
            assert_eq!(r, Err(DomainXmlError::TooManyAttributes(name.into())));
        }
        // Elements whose attributes are never read may carry any number.
        let xml = domain(&format!("<description{}/>", attrs(200_000)));
        assert!(finishes(move || parse_domain(xml.as_bytes(), NS).is_ok()));
        // Up to the bound is fine (the xmlns declaration counts).
        let xml = domain(&format!(
            "<metadata><vts:state xmlns:vts='{NS}'{}/></metadata>",
            attrs(MAX_ATTRIBUTES - 1)
        ));
        assert!(parse_domain(xml.as_bytes(), NS).unwrap().metadata.is_some());
        // Duplicates are still refused, prefixed ones included.
        for dup in [" a1='x' a1='y'", " p:a='x' p:a='y'"] {
            let xml = domain(&format!("<os xmlns:p='urn:p'{dup}/>"));
            assert!(matches!(
                parse_domain(xml.as_bytes(), NS),
                Err(DomainXmlError::Malformed(m)) if m.contains("duplicate attribute")
            ));
        }
    }

    #[test]
    fn refuses_too_many_namespaces_in_scope() {
        // Regression: the reader scans every binding in scope per element,
        // so many declarations times many elements was quadratic (about a
        // minute for 4 MiB).
        let decls =
            |n: usize| -> String { (0..n).map(|i| format!(" xmlns:p{i}='urn:p{i}'")).collect() };
        let xml = domain(&format!(
            "<description{}>{}</description>",
            decls(200_000),
            "<a/>".repeat(200_000)
        ));
        let r = finishes(move || parse_domain(xml.as_bytes(), NS).map(|_| ()));
        assert_eq!(r, Err(DomainXmlError::TooManyNamespaces));
        // Up to the bound, spread over nested elements, is fine; the count
        // drops again when an element closes.
        let half = MAX_NAMESPACES_IN_SCOPE / 2;
        let xml = domain(&format!("<a{0}><b{0}/></a><c{0}><d{0}/></c>", decls(half)));
        assert!(parse_domain(xml.as_bytes(), NS).is_ok());
        let xml = domain(&format!("<a{0}><b{0} xmlns:x='urn:x'/></a>", decls(half)));
        assert_eq!(
            parse_domain(xml.as_bytes(), NS),
            Err(DomainXmlError::TooManyNamespaces)
        );
    }

    #[test]
    fn malformed_messages_quote_nothing_and_stay_on_one_line() {
        // Regression (found by fuzzing the hook): quick-xml's message for a
        // garbled end tag quoted the document up to the next `>`, newlines
        // included: a second stderr line, and possibly a state file's base64.
        let xml = domain(&format!(
            "<metadata><vts:state xmlns:vts='{NS}'><vts:tpm version='2.0'>\
             <vts:file name='tpm2-00.permall'>SECRETBASE64\nMORE</vts:fileSECRET\nX></vts:tpm></vts:state></metadata>"
        ));
        let e = parse_domain(xml.as_bytes(), NS).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DomainXmlError::Malformed(_)), "{e:?}");
        assert!(!msg.contains("SECRET") && !msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("end tag does not match") && msg.contains("(line 2, column 5)"),
            "{msg}"
        );
        for bad in [
            "<a>x</b>",
            // (Attributes are parsed on the elements the reader reads.)
            "<os b='1' b='2'/>",
            "<x:a/>",
            "<a>&zzqq;</a>",
            "<os b=c/>",
            "<!-- x",
            "<a",
        ] {
            let xml = domain(bad);
            let msg = parse_domain(xml.as_bytes(), NS).unwrap_err().to_string();
            assert!(!msg.contains("zzqq") && !msg.contains('\n'), "{bad}: {msg}");
        }
    }

    #[test]
    fn refuses_characters_xml_does_not_allow() {
        // Regression (found by fuzzing): quick-xml accepted control
        // characters, raw or as character references; an accepted `host`
        // holding one could not be written back.
        for bad in [
            format!("<metadata><vts:state xmlns:vts='{NS}' host='a\u{16}b'/></metadata>"),
            format!("<metadata><vts:state xmlns:vts='{NS}' host='a&#1;b'/></metadata>"),
            format!("<metadata><vts:state xmlns:vts='{NS}'>&#x1F;</vts:state></metadata>"),
            "<description>\u{0}</description>".to_string(),
            "<description>\u{FFFE}</description>".to_string(),
            "<description>&#xFFFF;</description>".to_string(),
        ] {
            let xml = domain(&bad);
            assert!(
                matches!(
                    parse_domain(xml.as_bytes(), NS),
                    Err(DomainXmlError::Malformed(_))
                ),
                "{bad:?} accepted"
            );
        }
        // Tab, newline and CR are characters as references; written raw in
        // an attribute value they are read as a space (XML 1.0 §3.3.3).
        let xml = domain(&format!(
            "<metadata><vts:state xmlns:vts='{NS}' host='a&#9;&#10;&#13;b\t\r\nc'/></metadata>"
        ));
        let m = parse_domain(xml.as_bytes(), NS).unwrap().metadata.unwrap();
        assert_eq!(m.attr("host"), Some("a\t\n\rb  c"));
    }

    #[test]
    fn refuses_bad_uuid_and_wrong_root() {
        let xml = "<domain><name>x</name><uuid>../../etc</uuid></domain>";
        assert_eq!(
            parse_domain(xml.as_bytes(), NS),
            Err(DomainXmlError::BadUuid)
        );
        assert!(matches!(
            parse_domain(b"<network/>", NS),
            Err(DomainXmlError::NotADomain(_))
        ));
        assert!(parse_domain(b"<domain><name>x</name>", NS).is_err());
        assert!(parse_domain(b"", NS).is_err());
    }

    #[test]
    fn refuses_two_elements_of_our_namespace() {
        let xml = domain(&format!(
            "<metadata><a:state xmlns:a='{NS}'/><b:state xmlns:b='{NS}'/></metadata>"
        ));
        assert!(matches!(
            parse_domain(xml.as_bytes(), NS),
            Err(DomainXmlError::DuplicateMetadata(2, _))
        ));
    }

    #[test]
    fn nvram_specs() {
        let os = |inner: &str| {
            parse_domain(domain(inner).as_bytes(), NS)
                .unwrap()
                .os
                .nvram()
        };
        assert_eq!(os("<os><type>hvm</type></os>"), None);
        assert_eq!(
            os("<os firmware='efi'><type>hvm</type></os>"),
            Some(NvramSpec::Default)
        );
        assert_eq!(
            os("<os><loader type='pflash'>/c.fd</loader><nvram template='/t.fd'/></os>"),
            Some(NvramSpec::Default)
        );
        assert_eq!(
            os("<os><loader type='pflash'>/c.fd</loader><nvram template='/t.fd'>/var/lib/libvirt/qemu/nvram/v_VARS.fd</nvram></os>"),
            Some(NvramSpec::Path("/var/lib/libvirt/qemu/nvram/v_VARS.fd".into()))
        );
        assert_eq!(
            os("<os firmware='efi'><nvram type='file'>\n <source file='/srv/v.fd'/>\n</nvram></os>"),
            Some(NvramSpec::Path("/srv/v.fd".into()))
        );
        assert_eq!(
            os("<os firmware='efi'><nvram type='network'><source protocol='iscsi' name='x'/></nvram></os>"),
            Some(NvramSpec::Unsupported("network".into()))
        );
        assert_eq!(
            os("<os firmware='efi'><loader stateless='yes'/></os>"),
            None
        );
        assert_eq!(os("<os><loader type='rom'>/bios.bin</loader></os>"), None);
        // <varstore> (libvirt >= 12.1): its own spec, beside a ROM loader.
        let vs = |inner: &str| {
            parse_domain(domain(inner).as_bytes(), NS)
                .unwrap()
                .os
                .varstore()
        };
        assert_eq!(
            vs("<os><loader type='rom'>/usr/share/qemu/OVMF.fd</loader><varstore template='/t.json'/></os>"),
            Some(NvramSpec::Default)
        );
        assert_eq!(
            vs("<os><varstore template='/t.json' path='/var/lib/libvirt/qemu/varstore/v.json'/></os>"),
            Some(NvramSpec::Path("/var/lib/libvirt/qemu/varstore/v.json".into()))
        );
        assert_eq!(vs("<os firmware='efi'/>"), None);
        assert!(parse_domain(domain("<os><varstore/><varstore/></os>").as_bytes(), NS).is_err());
    }

    #[test]
    fn tpm_fields_are_read_only_under_devices() {
        // Fixed in the split into a path table: the backend of a TPM was
        // read from any `<X><tpm><backend>`, so another application's
        // metadata element named `tpm` could change what the domain's TPM
        // is. libvirt reads `devices/tpm` only.
        let xml = domain(
            "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>\
             <metadata><app:tpm xmlns:app='urn:app'><app:backend type='passthrough'/></app:tpm></metadata>",
        );
        let d = parse_domain(xml.as_bytes(), NS).unwrap();
        assert!(d.emulated_tpm().is_some(), "{:?}", d.tpms);
    }

    #[test]
    fn tpm_version_defaults() {
        let xml = domain("<devices><tpm model='tpm-tis'><backend type='emulator'/></tpm><tpm model='x'><backend type='passthrough'/></tpm></devices>");
        let d = parse_domain(xml.as_bytes(), NS).unwrap();
        assert_eq!(d.tpms.len(), 2);
        assert_eq!(
            d.emulated_tpm().unwrap().version_on(None),
            Some(Ok(TpmVersion::V1_2))
        );
        assert_eq!(d.tpms[1].backend, TpmBackend::Passthrough);
        assert_eq!(d.tpms[1].version_on(None), None);
    }

    #[test]
    fn default_tpm_version_follows_libvirt() {
        let dev = |model: Option<&str>| TpmDevice {
            model: model.map(str::to_string),
            backend: TpmBackend::Emulator {
                version: None,
                source: None,
                encryption_secret: None,
            },
        };
        let v = |m, arch| dev(m).version_on(arch).unwrap().unwrap();
        assert_eq!(v(Some("tpm-tis"), None), TpmVersion::V1_2);
        assert_eq!(v(Some("tpm-tis"), Some("x86_64")), TpmVersion::V1_2);
        assert_eq!(v(None, Some("i686")), TpmVersion::V1_2);
        assert_eq!(v(Some("tpm-tis"), Some("aarch64")), TpmVersion::V2_0);
        assert_eq!(v(None, Some("aarch64")), TpmVersion::V2_0);
        assert_eq!(v(None, Some("ppc64le")), TpmVersion::V2_0);
        assert_eq!(v(Some("tpm-crb"), Some("x86_64")), TpmVersion::V2_0);
        let xml = br#"<domain><name>a</name><uuid>1b4e28ba-2fa1-41d2-883f-0016d3cca427</uuid>
            <os><type arch="aarch64" machine="virt">hvm</type></os>
            <devices><tpm model="tpm-tis"><backend type="emulator"/></tpm></devices></domain>"#;
        let d = parse_domain(xml, crate::format::NAMESPACE_URI).unwrap();
        assert_eq!(d.os.arch.as_deref(), Some("aarch64"));
    }

    #[test]
    fn attribute_values_are_normalised_as_xml_says() {
        let xml = "<domain><name>a</name><uuid>1b4e28ba-2fa1-41d2-883f-0016d3cca427</uuid><metadata><s:state xmlns:s=\"urn:virt-tpm-state:1\" host=\"a\tb\r\nc\nd&#10;e&#9;f\" stored=\"x\ry\"/></metadata></domain>";
        let d = parse_domain(xml.as_bytes(), crate::format::NAMESPACE_URI).unwrap();
        let el = d.metadata.unwrap();
        assert_eq!(el.attr("host"), Some("a b c d\ne\tf"));
        assert_eq!(el.attr("stored"), Some("x y"));
    }

    #[test]
    fn the_domain_inside_a_snapshot() {
        let dom = "<domain type='kvm'><name>a</name><uuid>6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d</uuid><devices><disk/></devices></domain>";
        let snap = format!(
            "<domainsnapshot><name>s1</name><state>shutoff</state><creationTime>1765000000</creationTime><disks><disk name='vda'/></disks>{dom}<cookie><domain>x</domain></cookie></domainsnapshot>"
        );
        let got = parse_snapshot(snap.as_bytes()).unwrap();
        assert_eq!(got.domain, Some(dom.as_bytes()));
        assert_eq!(got.created, Some(1765000000));
        assert_eq!(got.state.as_deref(), Some("shutoff"));
        let info = parse_domain(got.domain.unwrap(), "urn:x").unwrap();
        assert_eq!(info.name.as_str(), "a");
        assert_eq!(
            parse_snapshot(b"<domainsnapshot><name>s</name></domainsnapshot>").unwrap(),
            SnapshotXml::default()
        );
        assert!(parse_snapshot(dom.as_bytes()).is_err());
        assert!(parse_snapshot(b"<domainsnapshot><domain>").is_err());
    }
}
