//! The forms an XML input of the CLI may take (docs/FORMAT.md §2.1): a full domain XML,
//! our element on its own in our namespace (`virsh dumpxml` cut down, a
//! manager's database), or the namespace-less element that
//! `virDomainGetMetadata` / `virsh metadata` return.
//!
//! A bare element has no domain around it: it is read by the same domain
//! reader, inside a minimal `<domain>` built around its bytes (nothing of it
//! is rewritten; a namespace-less root gets our namespace as its default
//! namespace declared on the wrapping `<metadata>` child), and the rules
//! that compare it with a domain (uuid binding, TPM version, swtpm
//! encryption) do not apply.

use crate::domain::{parse_domain, DomainInfo, DomainXmlError};
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

/// A parsed input and whether it came with a domain around it.
pub struct Input {
    pub info: DomainInfo,
    /// false: a bare element (the domain-dependent reader rules do not apply).
    pub domain_bound: bool,
}

/// The placeholder domain around a bare element (never used in a path:
/// nothing that restores accepts a bare element).
const BARE_NAME: &str = "(bare element)";
const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

pub fn parse_input(xml: &[u8], namespace: &str) -> Result<Input, DomainXmlError> {
    match root_of(xml, namespace) {
        Some(Root::Bare {
            start,
            namespaced,
            uuid,
        }) => {
            let uuid = uuid
                .filter(|u| crate::state::DomainUuid::parse(u).is_some())
                .unwrap_or_else(|| NIL_UUID.to_string());
            let mut doc = format!("<domain><name>{BARE_NAME}</name><uuid>{uuid}</uuid><metadata>")
                .into_bytes();
            if namespaced {
                doc.extend_from_slice(&xml[start..]);
            } else {
                // `<state …>` -> `<state xmlns="NS" …>`: the root and its
                // unprefixed children are then in our namespace, as libvirt
                // had them before it returned the element without one.
                let after = start + "<state".len();
                doc.extend_from_slice(&xml[start..after]);
                doc.extend_from_slice(format!(" xmlns=\"{}\"", attr_escape(namespace)).as_bytes());
                doc.extend_from_slice(&xml[after..]);
            }
            doc.extend_from_slice(b"</metadata></domain>");
            Ok(Input {
                info: parse_domain(&doc, namespace)?,
                domain_bound: false,
            })
        }
        _ => Ok(Input {
            info: parse_domain(xml, namespace)?,
            domain_bound: true,
        }),
    }
}

enum Root {
    Bare {
        /// Byte offset of the root's `<`.
        start: usize,
        namespaced: bool,
        uuid: Option<String>,
    },
    Other,
}

/// The root element, when it is our `state` element (in our namespace, or
/// in none). Anything unreadable is left to the domain reader, which says
/// what is wrong with it.
fn root_of(xml: &[u8], namespace: &str) -> Option<Root> {
    let mut reader = NsReader::from_reader(xml);
    loop {
        let before = reader.buffer_position() as usize;
        match reader.read_resolved_event() {
            Ok((ns, Event::Start(e) | Event::Empty(e))) => {
                if e.local_name().as_ref() != b"state" {
                    return Some(Root::Other);
                }
                let namespaced = match ns {
                    ResolveResult::Bound(n) if n.as_ref() == namespace.as_bytes() => true,
                    ResolveResult::Unbound if e.name().prefix().is_none() => false,
                    _ => return Some(Root::Other),
                };
                // The event starts at the first `<` after `before`
                // (whitespace and comments before it are separate events).
                let start = before + xml[before..].iter().position(|&b| b == b'<')?;
                let uuid = e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == b"uuid")
                    .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()));
                return Some(Root::Bare {
                    start,
                    namespaced,
                    uuid,
                });
            }
            // The domain reader refuses a DOCTYPE: leave it in front of it.
            Ok((_, Event::DocType(_))) => return Some(Root::Other),
            Ok((_, Event::Eof)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn attr_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    const NS: &str = crate::format::NAMESPACE_URI;

    #[test]
    fn forms() {
        let full = std::fs::read("fixtures/vectors/ok-tpm2.xml").unwrap();
        let full = parse_input(&full, NS).unwrap();
        assert!(full.domain_bound);
        let el = full.info.metadata.clone().unwrap();
        let u = el.attr("uuid").unwrap().to_string();
        let bare_ns = format!(
            "<?xml version=\"1.0\"?>\n<!-- c -->\n<v:state xmlns:v=\"{NS}\" format=\"1\" uuid=\"{u}\"><v:tpm/></v:state>"
        );
        let i = parse_input(bare_ns.as_bytes(), NS).unwrap();
        assert!(!i.domain_bound);
        assert_eq!(i.info.uuid.as_str(), u);
        assert_eq!(i.info.metadata.unwrap().children[0].name, "tpm");
        let bare = format!("<state format=\"1\" uuid=\"{u}\">\n  <tpm version=\"2.0\"/></state>");
        let i = parse_input(bare.as_bytes(), NS).unwrap();
        assert!(!i.domain_bound);
        let m = i.info.metadata.unwrap();
        assert_eq!(m.namespace.as_deref(), Some(NS));
        assert_eq!(m.children[0].namespace.as_deref(), Some(NS));
        // Another namespace's `state` is not ours: read as a domain (refused).
        assert!(parse_input(b"<x:state xmlns:x=\"urn:other\"/>", NS).is_err());
        // A DOCTYPE before a bare element is still refused by the reader.
        assert!(parse_input(
            b"<!DOCTYPE state [<!ENTITY a \"b\">]><state format=\"1\"/>",
            NS
        )
        .is_err());
    }
}
