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
pub(crate) struct Targets {
    pub(crate) live: bool,
    pub(crate) config: bool,
}

impl Targets {
    pub(crate) const NONE: Targets = Targets {
        live: false,
        config: false,
    };

    pub(crate) fn any(self) -> bool {
        self.live || self.config
    }

    /// "live", "config", or "live and config" (the store's summary line).
    pub(crate) fn describe(self) -> &'static str {
        match (self.live, self.config) {
            (true, true) => "live and config",
            (true, false) => "live",
            _ => "config",
        }
    }
}

/// What one copy of the definition holds in its `<metadata>`.
#[derive(Debug)]
pub(crate) enum Element {
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
pub(crate) struct Keys<'a> {
    /// The domain has a recipient set (recipients.d).
    pub(crate) recipients: bool,
    /// The newest host key's id, if this host has a key.
    pub(crate) newest_key: Option<&'a KeyId>,
    /// Plaintext is allowed (`--allow-plaintext` or the config).
    pub(crate) allow_plaintext: bool,
}

/// Everything a store is planned from.
pub(crate) struct PlanInput<'a> {
    pub(crate) uuid: &'a DomainUuid,
    /// The running domain's live copy; `None` when it is not running.
    pub(crate) live: Option<&'a Element>,
    /// The persistent definition; `None` for a transient domain.
    pub(crate) config: Option<&'a Element>,
    /// The settled local state (TPM, VARS or both) and its digest.
    pub(crate) state: &'a MachineState,
    pub(crate) digest: Sha256Sum,
    /// A snapshot revert recorded for this (stopped) domain.
    pub(crate) revert: Option<&'a RevertIntent>,
    pub(crate) keys: Keys<'a>,
    /// The watch daemon's store (see the table above).
    pub(crate) watch: bool,
    /// Now, as the element's `stored` records it (RFC 3339).
    pub(crate) now: &'a str,
    /// This host's name, as the element's `host` records it.
    pub(crate) host: &'a str,
}

/// The protection a new element gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Protect {
    /// For the domain's recipient set.
    Recipients,
    /// Sealed with this host key (the newest).
    HostKey(KeyId),
    /// Plaintext (allowed, or swtpm encrypts the TPM state itself).
    Plain,
}

/// A store that writes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StorePlan {
    pub(crate) targets: Targets,
    pub(crate) provenance: Provenance,
    pub(crate) protect: Protect,
    /// The definition's element was invalid and is replaced (for a warning).
    pub(crate) replaces_invalid: Option<String>,
}

/// A store that writes nothing, and the element the definition holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Nothing<'a> {
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
pub(crate) enum Plan<'a> {
    Write(StorePlan),
    Nothing(Nothing<'a>),
}

/// Why nothing can be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PlanError {
    /// A stopped transient domain: no definition is left to hold the state.
    NoDefinition,
    /// The element's generation is `u64::MAX`: the chain cannot count on.
    GenerationExhausted(u64),
    /// No recipients, no host key, and plaintext is not allowed.
    NoProtection,
}

/// Plans a store of `input.state`.
pub(crate) fn plan<'a>(input: &PlanInput<'a>) -> Result<Plan<'a>, PlanError> {
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
pub(crate) struct XmlSizes {
    /// The larger of the live and config XML.
    pub(crate) current: usize,
    /// Our element's length in the current XML (0: none).
    pub(crate) old_element: usize,
    /// The new element's length.
    pub(crate) new_element: usize,
}

impl XmlSizes {
    /// The sizes for a domain whose XML is `live` (and `config`), whose
    /// element, if the definition holds one, is replaced by `new_element`.
    pub(crate) fn of(
        live: &str,
        config: Option<&str>,
        holds_element: bool,
        new_element: usize,
    ) -> Self {
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
    pub(crate) fn check(self, limit: u64) -> Result<usize, usize> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateFile, TpmState, TpmVersion};
    use crate::swtpm::{synthetic_blob, FLAG_ENCRYPTED};

    const UUID: &str = "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d";
    const NOW: &str = "2026-12-07T03:00:00Z";
    const HOST: &str = "this-host";
    /// The local state's tag; the others name older elements.
    const L: &str = "local";

    fn d(tag: &str) -> Sha256Sum {
        Sha256Sum::of(tag.as_bytes())
    }

    /// What a copy's element is in a row: its state's tag and generation.
    #[derive(Clone, Copy)]
    enum El {
        Absent,
        Opened(&'static str, u64),
        Unopened(&'static str, u64),
        Invalid,
    }

    fn provenance(generation: u64) -> Provenance {
        Provenance {
            uuid: DomainUuid::parse(UUID).unwrap(),
            generation,
            parent: None,
            stored: "2026-01-01T00:00:00Z".into(),
            host: "earlier-host".into(),
        }
    }

    fn element(e: El) -> Element {
        match e {
            El::Absent => Element::Absent,
            El::Opened(tag, generation) => Element::Opened(MetadataState {
                provenance: provenance(generation),
                digest: d(tag),
                state: MachineState::new(None, None),
                sealed_with: Vec::new(),
                sealed_for: Vec::new(),
                age_files: Vec::new(),
            }),
            El::Unopened(tag, generation) => Element::Unopened {
                provenance: provenance(generation),
                digest: d(tag),
            },
            El::Invalid => Element::Invalid(FormatError::WrongElement("other".into())),
        }
    }

    /// What a plan comes to, comparable in a row.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Write {
            live: bool,
            config: bool,
            generation: u64,
            parent: Option<Sha256Sum>,
            /// A new provenance (stamped now, here); else a copy's own.
            fresh: bool,
            protect: Protect,
            replaces_invalid: bool,
        },
        Unchanged(u64),
        /// The snapshot the pending revert names.
        RevertPending(String),
        Err(PlanError),
    }

    struct Row {
        name: &'static str,
        /// `None`: not running.
        live: Option<El>,
        /// `None`: transient.
        config: Option<El>,
        watch: bool,
        /// A revert intent to the element of this tag.
        revert: Option<&'static str>,
        recipients: bool,
        key: bool,
        allow_plaintext: bool,
        swtpm_encrypted: bool,
        expect: Out,
    }

    fn row(name: &'static str) -> Row {
        Row {
            name,
            live: Some(El::Absent),
            config: Some(El::Absent),
            watch: false,
            revert: None,
            recipients: false,
            key: true,
            allow_plaintext: false,
            swtpm_encrypted: false,
            expect: Out::Err(PlanError::NoDefinition),
        }
    }

    /// A write of a new provenance with the host key (the common case).
    fn write(live: bool, config: bool, generation: u64, parent: Option<&str>) -> Out {
        Out::Write {
            live,
            config,
            generation,
            parent: parent.map(d),
            fresh: true,
            protect: Protect::HostKey(key_id()),
            replaces_invalid: false,
        }
    }

    /// A write that gives a copy the element the other holds already.
    fn copy_over(live: bool, config: bool, generation: u64) -> Out {
        Out::Write {
            live,
            config,
            generation,
            parent: None,
            fresh: false,
            protect: Protect::HostKey(key_id()),
            replaces_invalid: false,
        }
    }

    /// A first store into both copies, protected as `protect`.
    fn new_chain_as(protect: Protect) -> Out {
        Out::Write {
            live: true,
            config: true,
            generation: 1,
            parent: None,
            fresh: true,
            protect,
            replaces_invalid: false,
        }
    }

    fn key_id() -> KeyId {
        KeyId::parse("0123456789abcdef").unwrap()
    }

    fn run(r: &Row) -> Out {
        let uuid = DomainUuid::parse(UUID).unwrap();
        let live = r.live.map(element);
        let config = r.config.map(element);
        let flags = if r.swtpm_encrypted { FLAG_ENCRYPTED } else { 0 };
        let tpm = TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data: synthetic_blob(flags, b"state"),
            }],
        );
        let state = MachineState::new(Some(tpm), None);
        let revert = r.revert.map(|tag| RevertIntent {
            digest: d(tag),
            snapshot: tag.into(),
            by: "cli".into(),
        });
        let key = key_id();
        let input = PlanInput {
            uuid: &uuid,
            live: live.as_ref(),
            config: config.as_ref(),
            state: &state,
            digest: d(L),
            revert: revert.as_ref(),
            keys: Keys {
                recipients: r.recipients,
                newest_key: r.key.then_some(&key),
                allow_plaintext: r.allow_plaintext,
            },
            watch: r.watch,
            now: NOW,
            host: HOST,
        };
        match plan(&input) {
            Ok(Plan::Write(p)) => {
                assert_eq!(p.provenance.uuid, uuid, "{}", r.name);
                let fresh = p.provenance.stored == NOW && p.provenance.host == HOST;
                Out::Write {
                    live: p.targets.live,
                    config: p.targets.config,
                    generation: p.provenance.generation,
                    parent: p.provenance.parent,
                    fresh,
                    protect: p.protect,
                    replaces_invalid: p.replaces_invalid.is_some(),
                }
            }
            Ok(Plan::Nothing(Nothing::Unchanged(m))) => Out::Unchanged(m.provenance.generation),
            Ok(Plan::Nothing(Nothing::RevertPending { intent, .. })) => {
                Out::RevertPending(intent.snapshot.clone())
            }
            Err(e) => Out::Err(e),
        }
    }

    #[test]
    fn every_row_of_the_plan() {
        let rows = vec![
            // Running and persistent: two copies, each written when it differs.
            Row {
                expect: write(true, true, 1, None),
                ..row("running persistent, no element anywhere: both copies, generation 1")
            },
            Row {
                live: Some(El::Opened("old", 3)),
                config: Some(El::Opened("old", 3)),
                expect: write(true, true, 4, Some("old")),
                ..row("running persistent, both hold an older state: both, the next generation")
            },
            Row {
                live: Some(El::Opened(L, 2)),
                config: Some(El::Opened(L, 2)),
                expect: Out::Unchanged(2),
                ..row("running persistent, both hold the local state: unchanged")
            },
            Row {
                live: Some(El::Opened(L, 5)),
                config: Some(El::Absent),
                expect: copy_over(false, true, 5),
                ..row("running persistent, only live holds it: config gets the live element")
            },
            Row {
                live: Some(El::Opened(L, 5)),
                config: Some(El::Absent),
                watch: true,
                expect: copy_over(true, true, 5),
                ..row("the daemon, only live holds it: live is written with config")
            },
            Row {
                live: Some(El::Opened("old", 4)),
                config: Some(El::Opened(L, 6)),
                expect: copy_over(true, false, 6),
                ..row("running persistent, only config holds it: live gets the config element")
            },
            Row {
                live: Some(El::Opened("live-old", 3)),
                config: Some(El::Opened("config-old", 5)),
                expect: write(true, true, 6, Some("config-old")),
                ..row("config differs from live: the chain continues from the config")
            },
            // Running and transient: the live copy alone.
            Row {
                config: None,
                expect: write(true, false, 1, None),
                ..row("running transient, no element: live only")
            },
            Row {
                live: Some(El::Opened("old", 2)),
                config: None,
                expect: write(true, false, 3, Some("old")),
                ..row("running transient, an older element: live, the next generation")
            },
            Row {
                live: Some(El::Opened(L, 2)),
                config: None,
                watch: true,
                expect: Out::Unchanged(2),
                ..row("running transient, holding the local state: unchanged")
            },
            // Stopped and persistent: the config copy alone.
            Row {
                live: None,
                expect: write(false, true, 1, None),
                ..row("stopped persistent, no element: config only")
            },
            Row {
                live: None,
                config: Some(El::Opened("old", 7)),
                expect: write(false, true, 8, Some("old")),
                ..row("stopped persistent, an older element: config, the next generation")
            },
            Row {
                live: None,
                config: Some(El::Opened(L, 7)),
                expect: Out::Unchanged(7),
                ..row("stopped persistent, holding the local state: unchanged")
            },
            Row {
                live: None,
                config: None,
                expect: Out::Err(PlanError::NoDefinition),
                ..row("stopped transient: no definition to store into")
            },
            // A snapshot revert recorded for a stopped domain.
            Row {
                live: None,
                config: Some(El::Opened("snap", 4)),
                revert: Some("snap"),
                expect: Out::RevertPending("snap".into()),
                ..row("revert pending, the definition holds the snapshot's element: nothing")
            },
            Row {
                live: None,
                config: Some(El::Opened("old", 4)),
                revert: Some("other"),
                expect: Out::RevertPending("other".into()),
                ..row("revert pending to another element: nothing")
            },
            Row {
                live: None,
                config: Some(El::Opened(L, 4)),
                revert: Some(L),
                expect: Out::Unchanged(4),
                ..row("revert to the local state itself: nothing to hold back, unchanged")
            },
            Row {
                live: None,
                config: Some(El::Unopened("snap", 4)),
                revert: Some("snap"),
                expect: write(false, true, 5, Some("snap")),
                ..row("revert pending but the element cannot be opened here: stored")
            },
            Row {
                config: Some(El::Opened("snap", 4)),
                live: Some(El::Opened("snap", 4)),
                revert: Some("snap"),
                expect: write(true, true, 5, Some("snap")),
                ..row("a running domain ignores a revert intent (it is consumed at start)")
            },
            // The chain.
            Row {
                live: None,
                config: Some(El::Unopened("foreign", 9)),
                expect: write(false, true, 10, Some("foreign")),
                ..row("an element this host cannot open: the chain continues from its header")
            },
            Row {
                live: None,
                config: Some(El::Invalid),
                expect: Out::Write {
                    live: false,
                    config: true,
                    generation: 1,
                    parent: None,
                    fresh: true,
                    protect: Protect::HostKey(key_id()),
                    replaces_invalid: true,
                },
                ..row("an invalid element is replaced by a new chain (and said so)")
            },
            Row {
                live: None,
                config: Some(El::Opened("old", u64::MAX)),
                expect: Out::Err(PlanError::GenerationExhausted(u64::MAX)),
                ..row("the largest generation: the chain cannot count on")
            },
            Row {
                live: Some(El::Opened(L, u64::MAX)),
                config: Some(El::Absent),
                expect: copy_over(false, true, u64::MAX),
                ..row("the largest generation copied over, not counted on: stored")
            },
            // Protection.
            Row {
                recipients: true,
                expect: new_chain_as(Protect::Recipients),
                ..row("a recipient set wins over the host key")
            },
            Row {
                key: false,
                allow_plaintext: true,
                expect: new_chain_as(Protect::Plain),
                ..row("no key, plaintext allowed: plain")
            },
            Row {
                key: false,
                swtpm_encrypted: true,
                expect: new_chain_as(Protect::Plain),
                ..row("no key, swtpm encrypts the state itself: plain")
            },
            Row {
                key: false,
                expect: Out::Err(PlanError::NoProtection),
                ..row("no key, no recipients, no plaintext: refused")
            },
            Row {
                key: false,
                live: Some(El::Opened(L, 3)),
                config: Some(El::Opened(L, 3)),
                expect: Out::Unchanged(3),
                ..row("no key but nothing to write: unchanged, not refused")
            },
        ];
        for r in &rows {
            assert_eq!(run(r), r.expect, "row: {}", r.name);
        }
    }

    const XML: &str = "<domain><metadata><vts:state format='1'>abc</vts:state></metadata></domain>";

    /// (live XML, config XML, the definition holds an element, new element
    /// length, limit) -> the size after the store, or the size over the limit.
    type SizeRow = (
        &'static str,
        Option<&'static str>,
        bool,
        usize,
        u64,
        Result<usize, usize>,
    );

    #[test]
    fn the_size_check() {
        let element = "<vts:state format='1'>abc</vts:state>".len();
        assert_eq!(approx_element_len(XML), element);
        assert_eq!(approx_element_len("<domain/>"), 0);
        let rows: [SizeRow; 6] = [
            ("<domain/>", None, false, 100, 109, Ok(109)),
            ("<domain/>", None, false, 101, 109, Err(110)),
            (XML, None, true, 10, 1000, Ok(XML.len() - element + 10)),
            (XML, None, false, 10, 1000, Ok(XML.len() + 10)),
            ("<domain/>", Some(XML), false, 0, 1000, Ok(XML.len())),
            (
                XML,
                Some(XML),
                true,
                2000,
                1000,
                Err(XML.len() - element + 2000),
            ),
        ];
        for (live, config, holds, new, limit, expect) in rows {
            assert_eq!(
                XmlSizes::of(live, config, holds, new).check(limit),
                expect,
                "{live} {config:?} {holds} {new} {limit}"
            );
        }
    }
}
