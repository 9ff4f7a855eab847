//! Gather: everything `prepare` decides on, read and checked before any
//! write. First the element's side (what it holds that applies to this
//! domain here, and the domain rules: version, swtpm encryption), without
//! the lock; then, under the lock, the local side (L, J, the markers).

use super::error::ErrorKind;
use crate::carried::{tpm_version, Carried};
use crate::config::Config;
use crate::domain::{DomainInfo, TpmBackend};
use crate::envelope::Keyring;
use crate::format::{self, DecodeLimits, MetadataState, ENCODING_AGE, ENCODING_SEALED};
use crate::fs::{load_keyring, HostData, NvramLocation, RevertIntent, StateLocation};
use crate::name::DomainName;
use crate::paths::Paths;
use crate::state::{MachineState, Sha256Sum, TpmState, TpmVersion};
use crate::xml::XmlElement;
use std::path::PathBuf;

/// The element's side: what of the element applies to this domain here.
pub(super) struct Element {
    pub(crate) carried: Carried,
    /// The element, decoded (its provenance, its digest over everything).
    pub(crate) metadata: MetadataState,
    /// The sections of it that apply here (TPM, VARS).
    pub(crate) sections: (bool, bool),
    /// The state a restore writes: the element over those sections.
    pub(crate) target: MachineState,
}

/// Whether the element is this tool's business for this domain here.
pub(super) enum Found {
    NotOurs(&'static str),
    Element(Box<Element>),
}

impl Element {
    pub(crate) fn tpm_location(&self) -> Option<&StateLocation> {
        let (tpm, _) = self.sections;
        self.carried.tpm.as_ref().filter(|_| tpm).map(|(_, l)| l)
    }

    pub(crate) fn nvram_location(&self) -> Option<&NvramLocation> {
        let (_, nvram) = self.sections;
        self.carried.nvram.as_ref().filter(|_| nvram)
    }

    /// Where a report says the state went: the TPM state, else the VARS.
    pub(crate) fn shown_location(&self) -> PathBuf {
        self.tpm_location()
            .map(StateLocation::path)
            .or_else(|| self.nvram_location().map(NvramLocation::path))
            .expect("a section applies")
    }

    /// Where `state`'s sections go here: (TPM state, VARS file).
    pub(crate) fn destinations(&self, state: &MachineState) -> (Option<PathBuf>, Option<PathBuf>) {
        destinations(state, self.tpm_location(), self.nvram_location())
    }
}

/// Where `state`'s sections go at these locations (the intent records
/// them, and a run finishing it checks its XML names the same).
pub(super) fn destinations(
    state: &MachineState,
    tpm: Option<&StateLocation>,
    nvram: Option<&NvramLocation>,
) -> (Option<PathBuf>, Option<PathBuf>) {
    (
        state.tpm.as_ref().and(tpm).map(StateLocation::path),
        state.nvram.as_ref().and(nvram).map(NvramLocation::path),
    )
}

/// The element's side of a domain whose XML holds the element: decoded,
/// restricted to what applies here, checked against the domain's rules;
/// links in the way are refused before anything is written or locked.
pub(super) fn element(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
) -> Result<Found, ErrorKind> {
    let name = info.name.clone();
    let carried = Carried::of(paths, config, info)?;
    if carried.is_empty() {
        log::warn!(
            "VM {name}: the metadata holds TPM state but the domain has no emulated TPM; ignoring it"
        );
        return Ok(Found::NotOurs("the domain has no emulated TPM"));
    }
    let metadata = decode(paths, info, config)?.expect("element present");
    // The sections that apply here: those the element holds and the domain
    // (and config) carries. One digest over exactly those decides.
    let sections = carried.applicable(&metadata.state);
    warn_ignored(&name, &metadata.state, &carried, sections);
    if sections == (false, false) {
        return Ok(Found::NotOurs(
            "the metadata holds no section this domain uses",
        ));
    }
    if let (Some(tpm), Some(version), true) =
        (&metadata.state.tpm, carried.tpm_version(), sections.0)
    {
        tpm_rules(info, tpm, version, &config.namespace)?;
    }
    let element = Element {
        target: metadata.state.only(sections.0, sections.1),
        carried,
        metadata,
        sections,
    };
    if let Some(l) = element.tpm_location() {
        l.check_safe()?;
    }
    if let Some(l) = element.nvram_location() {
        l.check_safe()?;
    }
    Ok(Found::Element(Box::new(element)))
}

/// Says which sections of the element this domain does not use here.
fn warn_ignored(
    name: &DomainName,
    state: &MachineState,
    carried: &Carried,
    (use_tpm, _): (bool, bool),
) {
    let domain_kind = carried.nvram.as_ref().map(NvramLocation::kind);
    match (state.vars_kind(), domain_kind) {
        (Some(theirs), Some(ours)) if theirs != ours => log::warn!(
            "VM {name}: the metadata holds a {} variable store but the domain uses {}; ignoring that section",
            theirs.element(),
            ours.element()
        ),
        (Some(_), None) => log::warn!(
            "VM {name}: the metadata holds UEFI variables but the domain has no UEFI variable store here (or nvram = false); ignoring that section"
        ),
        _ => {}
    }
    if state.tpm.is_some() && !use_tpm {
        log::warn!(
            "VM {name}: the metadata holds TPM state but the domain has no emulated TPM; ignoring that section"
        );
    }
}

/// The domain rules for a TPM section: its version is the domain's, and
/// swtpm's own encryption matches `<encryption secret=…>` (swtpm reads an
/// encrypted state only with the key, and a plain one only without: a
/// mismatch would start a TPM that fails).
pub(super) fn tpm_rules(
    info: &DomainInfo,
    tpm: &TpmState,
    domain_version: TpmVersion,
    namespace: &str,
) -> Result<(), ErrorKind> {
    if tpm.version != domain_version {
        return Err(ErrorKind::VersionMismatch {
            ns: namespace.to_string(),
            metadata: tpm.version,
            domain: domain_version,
        });
    }
    let domain_encrypts = matches!(
        info.emulated_tpm().map(|t| &t.backend),
        Some(TpmBackend::Emulator {
            encryption_secret: Some(_),
            ..
        })
    );
    match (crate::swtpm::state_is_encrypted(tpm), domain_encrypts) {
        (true, false) => Err(ErrorKind::EncryptionMismatch {
            state: "encrypted",
            domain: "has no <encryption secret=...>",
        }),
        (false, true) => Err(ErrorKind::EncryptionMismatch {
            state: "not encrypted",
            domain: "has <encryption secret=...>",
        }),
        _ => Ok(()),
    }
}

/// The reader rules that depend on the domain, in the hook's order: the
/// TPM rules, then the uuid binding (a clone).
pub(super) fn reader_rules(
    info: &DomainInfo,
    m: &MetadataState,
    namespace: &str,
) -> Result<(), ErrorKind> {
    if let (Some(tpm), Some(version)) = (m.state.tpm.as_ref(), tpm_version(info)?) {
        tpm_rules(info, tpm, version, namespace)?;
    }
    if m.provenance.uuid != info.uuid {
        return Err(ErrorKind::Clone {
            uuid: info.uuid.clone(),
            element_uuid: m.provenance.uuid.clone(),
            ns: namespace.to_string(),
        });
    }
    Ok(())
}

/// Whether any file in the element is envelope-encrypted (only then are the
/// host keys read).
pub(crate) fn el_is_sealed(el: &XmlElement) -> bool {
    el.children
        .iter()
        .flat_map(|c| c.children.iter())
        .any(|f| matches!(f.attr("encoding"), Some(ENCODING_SEALED | ENCODING_AGE)))
}

/// Decodes our element of a parsed domain, if any.
pub(super) fn decode(
    paths: &Paths,
    info: &DomainInfo,
    config: &Config,
) -> Result<Option<MetadataState>, ErrorKind> {
    let Some(el) = &info.metadata else {
        return Ok(None);
    };
    let keys = if el_is_sealed(el) {
        load_keyring(paths)?
    } else {
        Keyring::default()
    };
    let limits = DecodeLimits {
        max_file_size: config.max_file_size,
    };
    match format::decode(el, limits, &keys) {
        Ok(m) => Ok(Some(m)),
        Err(source) if source.is_key_problem() => Err(ErrorKind::Key(source)),
        Err(source) => Err(ErrorKind::InvalidMetadata {
            ns: config.namespace.clone(),
            source,
        }),
    }
}

/// The local side, read under the domain's lock: L (live and kept, over
/// the sections that apply), J, and the markers the decision weighs.
pub(super) struct Local {
    pub(crate) live: Option<MachineState>,
    pub(crate) kept: Option<MachineState>,
    pub(crate) journal: Option<Sha256Sum>,
    /// A `migrate begin` or `restore begin` came just before.
    pub(crate) incoming: bool,
    /// An explicit snapshot revert recorded for this VM (any element).
    pub(crate) revert_intent: Option<RevertIntent>,
    /// libvirt said at `release` that a snapshot revert stopped this VM
    /// (>= 10.5): this start is the revert's own (or the next one within
    /// the marker's few minutes), with the snapshot's definition.
    pub(crate) stopped_by_revert: bool,
}

impl Local {
    /// R: this start follows a revert to exactly this element.
    pub(crate) fn revert(&self, element: &Element) -> bool {
        self.stopped_by_revert
            || self
                .revert_intent
                .as_ref()
                .is_some_and(|r| r.digest == element.metadata.digest)
    }
}

/// Reads the local side. Call with the lock held.
pub(super) fn local(
    host: &HostData,
    info: &DomainInfo,
    element: &Element,
    max: u64,
) -> Result<Local, ErrorKind> {
    let (tpm, nvram) = element.sections;
    let carried = &element.carried;
    Ok(Local {
        live: carried.read_live(tpm, nvram, max)?,
        kept: carried.read_kept(host, &info.uuid, tpm, nvram, max)?,
        journal: host.read_synced(&info.uuid)?,
        incoming: host.incoming(&info.uuid)?,
        revert_intent: host.read_revert(&info.uuid)?,
        stopped_by_revert: host.reverted(&info.uuid)?,
    })
}
