//! The store plan: what a store writes, where, and how protected. Pure: the
//! caller reads the domain's two definitions, the local state, the keys and
//! the clock; this decides.
//!
//! | situation                          | live copy                 | config copy          |
//! |------------------------------------|---------------------------|----------------------|
//! | running, persistent                | written when it differs\* | written when it differs |
//! | running, transient                 | written when it differs   | (none)               |
//! | stopped, persistent                | (none)                    | written when it differs |
//! | stopped, transient                 | refused: no definition    |                      |
//! | every copy holds the local state   | nothing: "unchanged"      |                      |
//! | stopped, a snapshot revert pending | nothing: "revert-pending" |                      |
//!
//! \* For the watch daemon the live copy is written whenever anything is:
//! libvirt then refuses the write once the domain has stopped, which leaves
//! a stopped domain's final state to the post-stop store.
//!
//! One digest keeps one provenance: a copy that holds the state already
//! gives the other its very element. Otherwise the chain continues from the
//! definition's element (its header, even when this host cannot open its
//! files), as the next generation. Protection: the domain's recipient set
//! wins over host keys; plaintext needs a permission, unless swtpm encrypts
//! the TPM state itself.

use crate::envelope::KeyId;
use crate::format::{FormatError, MetadataState, Provenance, NAMESPACE_PREFIX};
use crate::fs::RevertIntent;
use crate::state::{DomainUuid, MachineState, Sha256Sum};

/// Which copy of the definition a metadata write affects (the flags
/// `virDomainSetMetadata` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub live: bool,
    pub config: bool,
}

impl Targets {
    pub const NONE: Targets = Targets {
        live: false,
        config: false,
    };

    pub fn any(self) -> bool {
        self.live || self.config
    }

    /// "live", "config", or "live and config" (the store's summary line).
    pub fn describe(self) -> &'static str {
        match (self.live, self.config) {
            (true, true) => "live and config",
            (true, false) => "live",
            _ => "config",
        }
    }
}

/// What one copy of the definition holds in its `<metadata>`.
#[derive(Debug)]
pub enum Element {
    /// No element of ours.
    Absent,
    /// An element this host opened (decoded with its keys).
    Opened(MetadataState),
    /// An element whose header reads but whose files this host cannot open
    /// (sealed for another host, say): the chain still continues from it.
    Unopened {
        provenance: Provenance,
        digest: Sha256Sum,
    },
    /// An element whose header is invalid: a store replaces it.
    Invalid(FormatError),
}

impl Element {
    fn opened(&self) -> Option<&MetadataState> {
        match self {
            Element::Opened(m) => Some(m),
            _ => None,
        }
    }

    fn holds(&self, digest: Sha256Sum) -> bool {
        self.opened().is_some_and(|m| m.digest == digest)
    }
}

/// How the new element may be protected, as far as this host's
/// configuration goes (the key material stays with the caller).
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The domain has a recipient set (recipients.d).
    pub recipients: bool,
    /// The newest host key's id, if this host has a key.
    pub newest_key: Option<&'a KeyId>,
    /// Plaintext is allowed (`--allow-plaintext` or the config).
    pub allow_plaintext: bool,
}

/// Everything a store is planned from.
pub struct PlanInput<'a> {
    pub uuid: &'a DomainUuid,
    /// The running domain's live copy; `None` when it is not running.
    pub live: Option<&'a Element>,
    /// The persistent definition; `None` for a transient domain.
    pub config: Option<&'a Element>,
    /// The settled local state (TPM, VARS or both) and its digest.
    pub state: &'a MachineState,
    pub digest: Sha256Sum,
    /// A snapshot revert recorded for this (stopped) domain.
    pub revert: Option<&'a RevertIntent>,
    pub keys: Keys<'a>,
    /// The watch daemon's store (see the table above).
    pub watch: bool,
    /// Now, as the element's `stored` records it (RFC 3339).
    pub now: &'a str,
    /// This host's name, as the element's `host` records it.
    pub host: &'a str,
}

/// The protection a new element gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protect {
    /// For the domain's recipient set.
    Recipients,
    /// Sealed with this host key (the newest).
    HostKey(KeyId),
    /// Plaintext (allowed, or swtpm encrypts the TPM state itself).
    Plain,
}

/// A store that writes.
#[derive(Debug, PartialEq, Eq)]
pub struct StorePlan {
    pub targets: Targets,
    pub provenance: Provenance,
    pub protect: Protect,
    /// The definition's element was invalid and is replaced (for a warning).
    pub replaces_invalid: Option<String>,
}

/// A store that writes nothing, and the element the definition holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Nothing<'a> {
    /// Every copy that exists holds the local state already.
    Unchanged(&'a MetadataState),
    /// A revert to a snapshot's element is pending: the next start restores
    /// it and backs the local state up; storing now would put the replaced
    /// state back over the snapshot's element.
    RevertPending {
        held: &'a MetadataState,
        intent: &'a RevertIntent,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'a> {
    Write(StorePlan),
    Nothing(Nothing<'a>),
}

/// Why nothing can be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// A stopped transient domain: no definition is left to hold the state.
    NoDefinition,
    /// The element's generation is `u64::MAX`: the chain cannot count on.
    GenerationExhausted(u64),
    /// No recipients, no host key, and plaintext is not allowed.
    NoProtection,
}

/// Plans a store of `input.state`.
pub fn plan<'a>(input: &PlanInput<'a>) -> Result<Plan<'a>, PlanError> {
    let digest = input.digest;
    // A stopped domain has one definition: the config copy.
    let Some(holder) = input.config.or(input.live) else {
        return Err(PlanError::NoDefinition);
    };
    if input.live.is_none() {
        if let Some(nothing) = revert_pending(input.revert, holder, digest) {
            return Ok(Plan::Nothing(nothing));
        }
    }
    let config_needs = input.config.is_some_and(|c| !c.holds(digest));
    let targets = Targets {
        live: input
            .live
            .is_some_and(|l| !l.holds(digest) || (input.watch && config_needs)),
        config: config_needs,
    };
    if !targets.any() {
        // Every copy that exists holds the digest, the holder included.
        let held = holder
            .opened()
            .expect("a copy holding the digest is opened");
        return Ok(Plan::Nothing(Nothing::Unchanged(held)));
    }
    let (provenance, replaces_invalid) = provenance(input, holder)?;
    Ok(Plan::Write(StorePlan {
        targets,
        provenance,
        protect: protect(input)?,
        replaces_invalid,
    }))
}

/// A stopped domain whose revert intent names an element that is not
/// (both in the definition and locally) the state being stored.
fn revert_pending<'a>(
    revert: Option<&'a RevertIntent>,
    holder: &'a Element,
    digest: Sha256Sum,
) -> Option<Nothing<'a>> {
    let intent = revert?;
    let held = holder.opened()?;
    if held.digest == intent.digest && digest == intent.digest {
        return None;
    }
    Some(Nothing::RevertPending { held, intent })
}

fn provenance(
    input: &PlanInput<'_>,
    holder: &Element,
) -> Result<(Provenance, Option<String>), PlanError> {
    // One digest, one provenance: a copy holding the state lends its own.
    let same = [input.live, input.config]
        .into_iter()
        .flatten()
        .filter_map(Element::opened)
        .find(|m| m.digest == input.digest);
    if let Some(m) = same {
        return Ok((m.provenance.clone(), None));
    }
    let header = match holder {
        Element::Opened(m) => Some((&m.provenance, m.digest)),
        Element::Unopened { provenance, digest } => Some((provenance, *digest)),
        Element::Absent | Element::Invalid(_) => None,
    };
    let (generation, parent) = match header {
        Some((p, d)) => (
            p.generation
                .checked_add(1)
                .ok_or(PlanError::GenerationExhausted(p.generation))?,
            Some(d),
        ),
        None => (1, None),
    };
    let replaces_invalid = match holder {
        Element::Invalid(e) => Some(e.to_string()),
        _ => None,
    };
    Ok((
        Provenance {
            uuid: input.uuid.clone(),
            generation,
            parent,
            stored: input.now.to_string(),
            host: input.host.to_string(),
        },
        replaces_invalid,
    ))
}

fn protect(input: &PlanInput<'_>) -> Result<Protect, PlanError> {
    // swtpm's own encryption makes the TPM blob ciphertext; a VARS file
    // beside it travels as it is (UEFI variables, no TPM secrets).
    let swtpm_encrypted = input
        .state
        .tpm
        .as_ref()
        .is_some_and(crate::swtpm::state_is_encrypted);
    match (input.keys.recipients, input.keys.newest_key) {
        (true, _) => Ok(Protect::Recipients),
        (false, Some(id)) => Ok(Protect::HostKey(id.clone())),
        (false, None) if input.keys.allow_plaintext || swtpm_encrypted => Ok(Protect::Plain),
        (false, None) => Err(PlanError::NoProtection),
    }
}

/// The sizes the `max_domain_xml_size` check works from.
#[derive(Debug, Clone, Copy)]
pub struct XmlSizes {
    /// The larger of the live and config XML.
    pub current: usize,
    /// Our element's length in the current XML (0: none).
    pub old_element: usize,
    /// The new element's length.
    pub new_element: usize,
}

impl XmlSizes {
    /// The sizes for a domain whose XML is `live` (and `config`), whose
    /// element, if the definition holds one, is replaced by `new_element`.
    pub fn of(live: &str, config: Option<&str>, holds_element: bool, new_element: usize) -> Self {
        XmlSizes {
            current: live.len().max(config.map_or(0, str::len)),
            old_element: if holds_element {
                approx_element_len(live)
            } else {
                0
            },
            new_element,
        }
    }

    /// The domain XML's size after the store, if within `limit`; else
    /// `Err(size)`.
    pub fn check(self, limit: u64) -> Result<usize, usize> {
        let total = self.current.saturating_sub(self.old_element) + self.new_element;
        if total as u64 > limit {
            Err(total)
        } else {
            Ok(total)
        }
    }
}

/// Length of our element as it appears in `xml` (an upper bound for the
/// size check): from its start tag to its end tag.
fn approx_element_len(xml: &str) -> usize {
    let Some(start) = xml.find(&format!("<{NAMESPACE_PREFIX}:state")) else {
        return 0;
    };
    let end_tag = format!("</{NAMESPACE_PREFIX}:state>");
    xml[start..].find(&end_tag).map_or(0, |e| e + end_tag.len())
}
