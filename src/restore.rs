//! The `prepare` logic: decide, then restore the metadata state (or put the
//! kept copy back) into the state dir libvirt is about to use. The hook runs
//! it on `prepare begin`; `virt-tpm-state restore` runs the very same code
//! for a stopped domain. Never speaks to libvirt.

use crate::config::Config;
use crate::decision::{decide, Decision, DecisionInput, Refusal, Why};
use crate::domain::{parse_domain, DomainInfo, DomainXmlError, NvramSpec, TpmBackend};
use crate::envelope::Keyring;
use crate::exit::Exit;
use crate::format::{
    decode, DecodeLimits, FormatError, MetadataState, ENCODING_AGE, ENCODING_SEALED,
};
use crate::fs::{
    load_keyring, DomainLock, FsError, HostData, Intent, NvramLocation, Owner, StateLocation,
};
use crate::paths::Paths;
use crate::state::{DomainUuid, MachineState, Sha256Sum, TpmState, TpmVersion, VarsKind};
use std::path::PathBuf;
use std::time::Duration;

/// What `prepare` did, for logs and the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareReport {
    pub name: String,
    pub uuid: DomainUuid,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No emulated TPM, or nothing in the metadata: libvirt proceeds as if we
    /// were not installed.
    NotOurs(&'static str),
    /// Decided to leave the state dir as it is.
    Unchanged { why: Why, location: PathBuf },
    /// Wrote a state into the state dir (and/or the VARS file).
    Restored {
        why: Why,
        digest: Sha256Sum,
        size: usize,
        /// The TPM state dir, or the VARS file of a state without a TPM.
        location: PathBuf,
        /// The VARS file written beside the TPM state, if any.
        nvram: Option<PathBuf>,
        backup: Option<PathBuf>,
        generation: Option<u64>,
    },
}

impl PrepareReport {
    /// One line for logs (no state content, digest prefixes only).
    pub fn summary(&self) -> String {
        let who = format!("VM {} ({})", shown_name(&self.name), self.uuid);
        match &self.outcome {
            Outcome::NotOurs(why) => format!("{who}: nothing to do: {why}"),
            Outcome::Unchanged { why, location } => {
                format!(
                    "{who}: left {} as it is: {}",
                    location.display(),
                    why.describe()
                )
            }
            Outcome::Restored {
                why,
                digest,
                size,
                location,
                nvram,
                backup,
                generation,
            } => {
                let generation = generation
                    .map(|g| format!("generation {g}, "))
                    .unwrap_or_default();
                let backup = backup
                    .as_ref()
                    .map(|b| format!("; previous state backed up to {}", b.display()))
                    .unwrap_or_default();
                let what = if location.ends_with("_VARS.fd") && nvram.is_none() {
                    "UEFI variables"
                } else if nvram.is_some() {
                    "TPM state and UEFI variables"
                } else {
                    "TPM state"
                };
                let nvram = nvram
                    .as_ref()
                    .map(|n| format!(" and {}", n.display()))
                    .unwrap_or_default();
                format!(
                    "{who}: restored {what} ({generation}digest {}, {size} bytes) into {}{nvram}: {}{backup}",
                    digest.short(),
                    location.display(),
                    why.describe()
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    #[error("VM {name}: the TPM state in its metadata is invalid: {source}; nothing was written. Fix the XML, or remove the element with: virsh metadata {name} --uri {ns} --remove --config")]
    InvalidMetadata {
        name: String,
        ns: String,
        source: FormatError,
    },
    #[error(
        "VM {name}: cannot decrypt the TPM state in its metadata: {source}; nothing was written"
    )]
    Key { name: String, source: FormatError },
    #[error("VM {name}: the metadata holds a TPM {metadata} state but the domain's TPM is version {domain}; nothing was written. Set <backend version='{metadata}'> or remove the element with: virsh metadata {name} --uri {ns} --remove --config")]
    VersionMismatch {
        name: String,
        ns: String,
        metadata: TpmVersion,
        domain: TpmVersion,
    },
    #[error("VM {name}: the TPM backend version {0:?} is not one this tool knows (1.2 or 2.0)", .version)]
    UnknownTpmVersion { name: String, version: String },
    #[error("VM {name}: TPM state stored as <source type={kind:?}> is not supported yet (only type='dir' and type='file'); remove the element or the <source>")]
    UnsupportedSource { name: String, kind: String },
    #[error("VM {name} ({uuid}): the TPM state in its metadata belongs to domain {element_uuid} (a cloned XML?); nothing was written. For a fresh TPM remove it: virsh metadata {name} --uri {ns} --remove --config; to take that TPM over deliberately: virt-tpm-state adopt {name}")]
    Clone {
        name: String,
        uuid: DomainUuid,
        element_uuid: DomainUuid,
        ns: String,
    },
    #[error("VM {name}: the local TPM state ({local}…) changed since it was last stored and differs from the metadata ({metadata}…), and on_conflict = \"refuse\"; nothing was written. Keep the local state: virt-tpm-state store {name}; take the metadata: virt-tpm-state restore --force {name}")]
    Conflict {
        name: String,
        local: String,
        metadata: String,
    },
    #[error("VM {name}: the metadata state is {state} by swtpm but the domain's TPM {domain}; swtpm could not read it. Fix the <encryption> element or remove the metadata element")]
    EncryptionMismatch {
        name: String,
        state: &'static str,
        domain: &'static str,
    },
    #[error("VM {name}: {source}")]
    Fs { name: String, source: FsError },
    #[error("VM {name}: an interrupted restore (digest {digest}…) into {} must be finished first, but this XML names other state locations; nothing was written. Start it once with the XML naming those locations", describe_at(.tpm, .nvram))]
    UnfinishedElsewhere {
        name: String,
        tpm: Option<String>,
        nvram: Option<String>,
        digest: String,
    },
}

fn describe_at(tpm: &Option<String>, nvram: &Option<String>) -> String {
    [tpm.as_deref(), nvram.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ")
}

impl RestoreError {
    /// Exit codes shared by the hook and the CLI (README, "Exit codes").
    pub fn exit_code(&self) -> Exit {
        match self {
            RestoreError::DomainXml(_) => Exit::DomainXml,
            RestoreError::Key { .. } => Exit::Key,
            RestoreError::InvalidMetadata { .. }
            | RestoreError::VersionMismatch { .. }
            | RestoreError::UnknownTpmVersion { .. }
            | RestoreError::UnsupportedSource { .. }
            | RestoreError::EncryptionMismatch { .. } => Exit::InvalidElement,
            RestoreError::Clone { .. } => Exit::Clone,
            RestoreError::Conflict { .. } => Exit::Conflict,
            RestoreError::Fs { source, .. } => source.exit_code(),
            RestoreError::UnfinishedElsewhere { .. } => Exit::Filesystem,
        }
    }

    fn fs(name: &str) -> impl FnOnce(FsError) -> RestoreError + '_ {
        move |source| RestoreError::Fs {
            name: shown_name(name),
            source,
        }
    }
}

/// A domain name as shown in messages: quoted, control characters escaped,
/// so a hostile name cannot forge log lines.
pub fn shown_name(name: &str) -> String {
    crate::name::DomainName::new(name).to_string()
}

/// Options that differ between the hook and the CLI.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareOptions {
    /// `restore --force`: the metadata wins even over a newer local state.
    pub force_metadata: bool,
}

/// Where the domain's swtpm state lives, from its `<tpm>` device.
pub fn state_location(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    version: TpmVersion,
) -> Result<StateLocation, RestoreError> {
    let name = shown_name(&info.name);
    match info.emulated_tpm().map(|t| &t.backend) {
        Some(TpmBackend::Emulator {
            source: Some(src), ..
        }) => match src.kind.as_str() {
            "dir" => StateLocation::from_source(paths, &src.path, &config.state_path_prefixes)
                .map_err(RestoreError::fs(&info.name)),
            "file" => {
                StateLocation::from_source_file(paths, &src.path, &config.state_path_prefixes)
                    .map_err(RestoreError::fs(&info.name))
            }
            other => Err(RestoreError::UnsupportedSource {
                name,
                kind: other.to_string(),
            }),
        },
        _ => Ok(StateLocation::default_for(paths, &info.uuid, version)),
    }
}

/// What the element carries for one domain on this host: its emulated TPM
/// (version and state dir) and/or its UEFI variable store. The same rule
/// decides what `store` writes and what the hook restores.
#[derive(Debug, Clone)]
pub struct Carried {
    pub tpm: Option<(TpmVersion, StateLocation)>,
    pub nvram: Option<NvramLocation>,
}

impl Carried {
    pub fn is_empty(&self) -> bool {
        self.tpm.is_none() && self.nvram.is_none()
    }

    pub fn tpm_version(&self) -> Option<TpmVersion> {
        self.tpm.as_ref().map(|(v, _)| *v)
    }

    /// The sections (TPM, VARS) this domain carries here. "The local state
    /// matches the element" means: over exactly these, the element's
    /// digest is the local state's (`show`, `status`, `watch`). A section
    /// the element holds and the domain does not carry (VARS on a domain
    /// without UEFI) is not compared, and not restored; one the domain
    /// carries and the element lacks is a mismatch (the next store adds it).
    pub fn sections(&self) -> (bool, bool) {
        (self.tpm.is_some(), self.nvram.is_some())
    }

    /// The sections of the element's `state` that a restore here writes:
    /// those it holds and the domain carries. A variable store of the other
    /// kind (a pflash VARS file for a domain that now uses `<varstore>`, or
    /// the reverse) is not this domain's: its content means nothing to the
    /// other device.
    pub fn applicable(&self, state: &MachineState) -> (bool, bool) {
        let domain_kind = self.nvram.as_ref().map(NvramLocation::kind);
        (
            state.tpm.is_some() && self.tpm.is_some(),
            state.nvram.is_some() && domain_kind.is_some() && state.vars_kind() == domain_kind,
        )
    }

    /// The live state of the carried parts restricted to `tpm`/`nvram`
    /// (the sections the metadata holds): `None` when the TPM state (or,
    /// without a TPM, the VARS file) does not exist. A missing VARS file
    /// beside a TPM state is a state without NVRAM.
    pub fn read_live(
        &self,
        tpm: bool,
        nvram: bool,
        max: u64,
    ) -> Result<Option<MachineState>, FsError> {
        let tpm_state = match (&self.tpm, tpm) {
            (Some((version, location)), true) => match location.read(*version, max)? {
                Some(s) => Some(s),
                None => return Ok(None),
            },
            _ => None,
        };
        let (vars, kind) = match (&self.nvram, nvram) {
            (Some(location), true) => (location.read(max)?, location.kind()),
            _ => (None, VarsKind::Nvram),
        };
        let state = MachineState::with_vars(tpm_state, kind, vars);
        Ok((!state.is_empty()).then_some(state))
    }
}

/// What of the domain in `info` the element carries here, from its XML and
/// the config (`nvram`, `nvram_without_tpm`).
pub fn carried(paths: &Paths, config: &Config, info: &DomainInfo) -> Result<Carried, RestoreError> {
    let tpm = match domain_tpm_version(info)? {
        Some(v) => Some((v, state_location(paths, config, info, v)?)),
        None => None,
    };
    // A `<varstore>` (QEMU's uefi-vars JSON) replaces the pflash NVRAM:
    // libvirt allows only one of them per domain.
    let (spec, kind) = match info.os.varstore() {
        Some(spec) => (Some(spec), VarsKind::Varstore),
        None => (info.os.nvram(), VarsKind::Nvram),
    };
    let nvram = if config.nvram && (tpm.is_some() || config.nvram_without_tpm) {
        match spec {
            None => None,
            Some(NvramSpec::Default) => Some(
                NvramLocation::default_for(paths, &info.name, kind)
                    .map_err(RestoreError::fs(&info.name))?,
            ),
            Some(NvramSpec::Path(p)) => {
                let libvirt_dir = match kind {
                    VarsKind::Nvram => crate::paths::LIBVIRT_NVRAM_DIR,
                    VarsKind::Varstore => crate::paths::LIBVIRT_VARSTORE_DIR,
                };
                let mut allowed = vec![PathBuf::from(libvirt_dir)];
                allowed.extend(config.state_path_prefixes.iter().cloned());
                Some(
                    NvramLocation::from_path(paths, &p, &allowed, kind)
                        .map_err(RestoreError::fs(&info.name))?,
                )
            }
            Some(NvramSpec::Unsupported(kind)) => {
                log::warn!(
                    "VM {}: its <nvram type='{kind}'> is not a file; its UEFI variables are not carried",
                    shown_name(&info.name)
                );
                None
            }
        }
    } else {
        None
    };
    Ok(Carried { tpm, nvram })
}

/// The emulated TPM's version, if the domain has an emulated TPM.
pub fn domain_tpm_version(info: &DomainInfo) -> Result<Option<TpmVersion>, RestoreError> {
    match info
        .emulated_tpm()
        .and_then(|t| t.version_on(info.os.arch.as_deref()))
    {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(v)) => Err(RestoreError::UnknownTpmVersion {
            name: shown_name(&info.name),
            version: v,
        }),
    }
}

/// Whether any file in the element is envelope-encrypted (only then are the
/// host keys read).
pub fn el_is_sealed(el: &crate::domain::XmlElement) -> bool {
    el.children
        .iter()
        .flat_map(|c| c.children.iter())
        .any(|f| matches!(f.attr("encoding"), Some(ENCODING_SEALED | ENCODING_AGE)))
}

/// Decodes our element of a parsed domain, if any.
pub fn metadata_state(
    paths: &Paths,
    info: &DomainInfo,
    config: &Config,
) -> Result<Option<MetadataState>, RestoreError> {
    let Some(el) = &info.metadata else {
        return Ok(None);
    };
    let keys = if el_is_sealed(el) {
        load_keyring(paths).map_err(RestoreError::fs(&info.name))?
    } else {
        Keyring::default()
    };
    decode(
        el,
        DecodeLimits {
            max_file_size: config.max_file_size,
        },
        &keys,
    )
    .map(Some)
    .map_err(|source| match source {
        source if source.is_key_problem() => RestoreError::Key {
            name: shown_name(&info.name),
            source,
        },
        source => RestoreError::InvalidMetadata {
            name: shown_name(&info.name),
            ns: config.namespace.clone(),
            source,
        },
    })
}

/// Runs the decision rule for the domain in `xml` and carries it out.
/// Everything is validated before the first write.
pub fn prepare(
    paths: &Paths,
    config: &Config,
    xml: &[u8],
    options: PrepareOptions,
) -> Result<PrepareReport, RestoreError> {
    let info = parse_domain(xml, &config.namespace)?;
    prepare_domain(paths, config, &info, options)
}

pub fn prepare_domain(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
) -> Result<PrepareReport, RestoreError> {
    prepare_with_lock(paths, config, info, options, None)
}

/// [`prepare_domain`] for a caller that already holds the domain's lock
/// and read `info` under it (`restore DOMAIN`): no `store` can change the
/// element between that read and the decision, so a definition read just
/// before a store finished is never taken for a new one.
pub fn prepare_domain_locked(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
    lock: &DomainLock,
) -> Result<PrepareReport, RestoreError> {
    assert_eq!(lock.uuid(), &info.uuid, "the lock held is another domain's");
    prepare_with_lock(paths, config, info, options, Some(lock))
}

fn prepare_with_lock(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    options: PrepareOptions,
    held: Option<&DomainLock>,
) -> Result<PrepareReport, RestoreError> {
    // The domain's lock, unless the caller holds it (flock is per open
    // file: taking it again here would wait for ourselves).
    let lock = |host: &HostData| -> Result<Option<DomainLock>, RestoreError> {
        match held {
            Some(_) => Ok(None),
            None => host
                .lock(&info.uuid, Duration::from_secs(config.lock_timeout_secs))
                .map(Some)
                .map_err(RestoreError::fs(&info.name)),
        }
    };
    let report = |outcome| PrepareReport {
        name: info.name.clone(),
        uuid: info.uuid.clone(),
        outcome,
    };
    let name = shown_name(&info.name);
    if info.metadata.is_none() {
        // An XML without the element (a manager rolling back) still must
        // not start a half-restored state.
        let host = HostData::new(paths);
        if host
            .has_intent(&info.uuid)
            .map_err(RestoreError::fs(&info.name))?
        {
            let carried = carried(paths, config, info)?;
            let _lock = lock(&host)?;
            finish_intent(paths, &host, info, &carried)?;
        }
        return Ok(report(Outcome::NotOurs(
            "no virt-tpm-state element in the metadata",
        )));
    }
    let carried = carried(paths, config, info)?;
    if carried.is_empty() {
        log::warn!(
            "VM {name}: the metadata holds TPM state but the domain has no emulated TPM; ignoring it"
        );
        return Ok(report(Outcome::NotOurs("the domain has no emulated TPM")));
    }
    let m = metadata_state(paths, info, config)?.expect("element present");
    // The sections that apply here: those the element holds and the domain
    // (and config) carries. One digest over exactly those decides.
    let (use_tpm, use_nvram) = carried.applicable(&m.state);
    let domain_kind = carried.nvram.as_ref().map(NvramLocation::kind);
    match (m.state.vars_kind(), domain_kind) {
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
    if m.state.tpm.is_some() && !use_tpm {
        log::warn!(
            "VM {name}: the metadata holds TPM state but the domain has no emulated TPM; ignoring that section"
        );
    }
    if !use_tpm && !use_nvram {
        return Ok(report(Outcome::NotOurs(
            "the metadata holds no section this domain uses",
        )));
    }
    if let (Some(tpm), Some(domain_version)) = (
        m.state.tpm.as_ref().filter(|_| use_tpm),
        carried.tpm_version(),
    ) {
        if tpm.version != domain_version {
            return Err(RestoreError::VersionMismatch {
                name,
                ns: config.namespace.clone(),
                metadata: tpm.version,
                domain: domain_version,
            });
        }
        check_encryption(info, tpm, &name)?;
    }
    let m_here = m.state.only(use_tpm, use_nvram);
    let m_digest = m_here.digest();
    let tpm_location = carried.tpm.as_ref().filter(|_| use_tpm).map(|(_, l)| l);
    let nvram_location = carried.nvram.as_ref().filter(|_| use_nvram);
    // Links in the way are refused before anything is written or locked.
    if let Some(l) = tpm_location {
        l.check_safe().map_err(RestoreError::fs(&info.name))?;
    }
    if let Some(l) = nvram_location {
        l.check_safe().map_err(RestoreError::fs(&info.name))?;
    }

    let host = HostData::new(paths);
    let _lock = lock(&host)?;
    fault(&info.name, "restore.locked")?;
    remove_leftovers(
        &host,
        &info.uuid,
        carried.tpm.as_ref().map(|(_, l)| l),
        carried.nvram.as_ref(),
    );
    finish_intent(paths, &host, info, &carried)?;
    let max = config.max_file_size;
    let live = carried
        .read_live(use_tpm, use_nvram, max)
        .map_err(RestoreError::fs(&info.name))?;
    let kept = host
        .read_kept_state(
            &info.uuid,
            carried.tpm_version().filter(|_| use_tpm),
            use_nvram,
            max,
        )
        .map_err(RestoreError::fs(&info.name))?;
    let journal = host
        .read_synced(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    let incoming = host
        .incoming(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    // An explicit snapshot revert counts only for exactly this element.
    let revert_intent = host
        .read_revert(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    // Or libvirt said at `release` that a revert stopped this VM (>= 10.5):
    // this start is the revert's own (or the next one within the marker's
    // few minutes), with the snapshot's definition.
    let stopped_by_revert = host
        .reverted(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    let revert = stopped_by_revert || revert_intent.as_ref().is_some_and(|r| r.digest == m.digest);

    let mut decision = decide(&DecisionInput {
        domain_uuid: &info.uuid,
        metadata: Some((&m.provenance.uuid, m_digest)),
        journal,
        live: live.as_ref().map(MachineState::digest),
        kept: kept.as_ref().map(MachineState::digest),
        incoming,
        revert,
        policy: config.on_conflict,
    });
    if options.force_metadata {
        if let Decision::Nothing(Why::LocalNewer)
        | Decision::RestoreKept(Why::LocalNewer)
        | Decision::Refuse(Refusal::Conflict { .. }) = decision
        {
            decision = Decision::RestoreMetadata {
                backup_local: live.is_some() || kept.is_some(),
                why: Why::MetadataNewer,
            };
        }
    }
    let shown_location = tpm_location
        .map(StateLocation::path)
        .or_else(|| nvram_location.map(NvramLocation::path))
        .expect("a section applies");
    let shown_nvram = |state: &MachineState| {
        state
            .nvram
            .as_ref()
            .and(tpm_location)
            .and(nvram_location)
            .map(NvramLocation::path)
    };
    let write = |state: &MachineState| -> Result<(), RestoreError> {
        write_state(paths, &info.name, state, tpm_location, nvram_location)
    };
    // A VARS file present while the TPM state is not (`undefine
    // --keep-nvram`, a TPM dir deleted by hand) is not part of L, yet a
    // restore replaces it: back it up first when it differs, so nothing is
    // lost without a copy.
    let backup_stray_vars = |target: &MachineState| -> Result<Option<PathBuf>, RestoreError> {
        let (Some(l), Some(want)) = (nvram_location, &target.nvram) else {
            return Ok(None);
        };
        match l.read(max).map_err(RestoreError::fs(&info.name))? {
            Some(v) if v != want.data => Ok(Some(
                host.backup(
                    &info.uuid,
                    &MachineState::with_vars(None, l.kind(), Some(v)),
                    config.backups_per_domain,
                )
                .map_err(RestoreError::fs(&info.name))?,
            )),
            _ => Ok(None),
        }
    };
    let done = match decision {
        Decision::Nothing(why) => {
            if why == Why::AlreadyCurrent {
                host.record_sync(&info.uuid, &m_here)
                    .map_err(RestoreError::fs(&info.name))?;
            }
            Ok(report(Outcome::Unchanged {
                why,
                location: shown_location,
            }))
        }
        Decision::RestoreKept(why) => {
            let state = kept.expect("decided on a kept copy");
            crate::gc::enforce(paths, config, &info.uuid, state.total_size() as u64);
            let backup = backup_stray_vars(&state)?;
            write(&state)?;
            if why == Why::AlreadyCurrent {
                host.record_sync(&info.uuid, &m_here)
                    .map_err(RestoreError::fs(&info.name))?;
            }
            Ok(report(Outcome::Restored {
                why,
                digest: state.digest(),
                size: state.total_size(),
                location: shown_location,
                nvram: shown_nvram(&state),
                backup,
                generation: None,
            }))
        }
        Decision::RestoreMetadata { backup_local, why } => {
            // Room first: a backup and a kept copy are about to be written.
            let local_size = live
                .as_ref()
                .or(kept.as_ref())
                .map_or(0, |l| l.total_size());
            crate::gc::enforce(
                paths,
                config,
                &info.uuid,
                (local_size + m_here.total_size()) as u64,
            );
            let mut backup = None;
            if backup_local {
                if let Some(local) = live.as_ref().or(kept.as_ref()) {
                    backup = Some(
                        host.backup(&info.uuid, local, config.backups_per_domain)
                            .map_err(RestoreError::fs(&info.name))?,
                    );
                }
            }
            if backup.is_none() {
                backup = backup_stray_vars(&m_here)?;
            }
            fault(&info.name, "restore.backed_up")?;
            // A missing nvram dir refuses before the journal is touched.
            if let (Some(_), Some(l)) = (&m_here.nvram, nvram_location) {
                l.check_dir_exists().map_err(RestoreError::fs(&info.name))?;
            }
            // What is live now, to tell a failed write that changed nothing.
            let tpm_before = tpm_location.map(|l| {
                l.read(
                    m_here.tpm.as_ref().map_or(TpmVersion::V2_0, |t| t.version),
                    max,
                )
                .ok()
                .flatten()
            });
            let vars_before = nvram_location.map(|l| l.read(max).ok().flatten());
            // The journal: from here until J, the next run on this VM
            // finishes this restore before it decides anything.
            host.write_intent(
                &info.uuid,
                &Intent {
                    target: m_here.clone(),
                    tpm_at: m_here
                        .tpm
                        .as_ref()
                        .and(tpm_location)
                        .map(StateLocation::path),
                    nvram_at: m_here
                        .nvram
                        .as_ref()
                        .and(nvram_location)
                        .map(NvramLocation::path),
                    backup: backup.clone(),
                },
            )
            .map_err(RestoreError::fs(&info.name))?;
            if let Err(e) = write(&m_here) {
                // Failed (not killed): when nothing live changed, the intent
                // goes too, so "nothing was written" stays true. Otherwise
                // it stays for the next run to finish.
                let now_tpm = tpm_location.map(|l| {
                    l.read(
                        m_here.tpm.as_ref().map_or(TpmVersion::V2_0, |t| t.version),
                        max,
                    )
                    .ok()
                    .flatten()
                });
                let now_vars = nvram_location.map(|l| l.read(max).ok().flatten());
                if now_tpm == tpm_before && now_vars == vars_before {
                    if let Err(e) = host.clear_intent(&info.uuid) {
                        log::warn!("VM {name}: {e}");
                    }
                }
                return Err(e);
            }
            fault(&info.name, "restore.written")?;
            host.record_sync(&info.uuid, &m_here)
                .map_err(RestoreError::fs(&info.name))?;
            fault(&info.name, "restore.synced")?;
            host.clear_intent(&info.uuid)
                .map_err(RestoreError::fs(&info.name))?;
            Ok(report(Outcome::Restored {
                why,
                digest: m_digest,
                size: m_here.total_size(),
                location: shown_location,
                nvram: shown_nvram(&m_here),
                backup,
                generation: Some(m.provenance.generation),
            }))
        }
        Decision::Refuse(Refusal::Clone { element_uuid }) => Err(RestoreError::Clone {
            name,
            uuid: info.uuid.clone(),
            element_uuid,
            ns: config.namespace.clone(),
        }),
        Decision::Refuse(Refusal::Conflict { metadata, local }) => Err(RestoreError::Conflict {
            name,
            local: local.short(),
            metadata: metadata.short(),
        }),
    };
    // A revert intent is consumed by the first start after it, whether it
    // named this element or not (a start with another element means the
    // definition moved on since the revert).
    if let (true, Ok(_)) = (stopped_by_revert, &done) {
        host.clear_reverted(&info.uuid)
            .map_err(RestoreError::fs(&info.name))?;
    }
    if let (Some(r), Ok(_)) = (&revert_intent, &done) {
        host.clear_revert(&info.uuid)
            .map_err(RestoreError::fs(&info.name))?;
        if r.digest != m.digest {
            log::info!(
                "VM {} ({}): the revert to snapshot {} (element {}) was not for the element this start carries ({}); dropped it",
                shown_name(&info.name),
                info.uuid,
                shown_name(&r.snapshot),
                r.digest.short(),
                m.digest.short()
            );
        }
    }
    done
}

/// The reader rules that depend on the domain (docs/FORMAT.md §4, "Reader
/// rules"): the checks `verify`, `show --check` and `extract` apply to a
/// decoded element, in the hook's order and with its errors (so its exit
/// codes): the TPM version against the domain's emulated TPM, swtpm's own
/// encryption against `<encryption secret=…>`, then the uuid binding (a
/// clone, exit 5). `domain_bound` is false for a bare element (no domain to
/// compare with): then nothing here applies.
pub fn reader_check(
    info: &DomainInfo,
    m: &MetadataState,
    namespace: &str,
    domain_bound: bool,
) -> Result<(), RestoreError> {
    if !domain_bound {
        return Ok(());
    }
    let name = shown_name(&info.name);
    if let (Some(tpm), Some(domain_version)) = (m.state.tpm.as_ref(), domain_tpm_version(info)?) {
        if tpm.version != domain_version {
            return Err(RestoreError::VersionMismatch {
                name,
                ns: namespace.to_string(),
                metadata: tpm.version,
                domain: domain_version,
            });
        }
        check_encryption(info, tpm, &name)?;
    }
    if m.provenance.uuid != info.uuid {
        return Err(RestoreError::Clone {
            name,
            uuid: info.uuid.clone(),
            element_uuid: m.provenance.uuid.clone(),
            ns: namespace.to_string(),
        });
    }
    Ok(())
}

/// Writes one machine state: the VARS file first, then the TPM state (one
/// rename each). Idempotent: a restore interrupted anywhere is finished by
/// writing the same state again.
fn write_state(
    paths: &Paths,
    name: &str,
    state: &MachineState,
    tpm_location: Option<&StateLocation>,
    nvram_location: Option<&NvramLocation>,
) -> Result<(), RestoreError> {
    if let (Some(vars), Some(l)) = (&state.nvram, nvram_location) {
        l.replace(
            &vars.data,
            Owner::qemu(paths).map_err(RestoreError::fs(name))?,
        )
        .map_err(RestoreError::fs(name))?;
    }
    if let (Some(tpm), Some(l)) = (&state.tpm, tpm_location) {
        l.replace(
            tpm.version,
            tpm.files(),
            Owner::swtpm(paths).map_err(RestoreError::fs(name))?,
        )
        .map_err(RestoreError::fs(name))?;
    }
    Ok(())
}

/// Finishes a restore that an earlier run on this VM recorded and did not
/// complete (killed, or failed after its first rename): writes the whole
/// target state again (VARS file, TPM state), records `J`, removes the
/// intent. So the live TPM and VARS are always of one generation, whatever
/// XML this run got, before anything reads or decides on them. Call with
/// the domain's lock held. The target locations must be the ones this XML
/// names (else exit 8: the admin finishes it with the XML it was for).
pub fn finish_intent(
    paths: &Paths,
    host: &HostData,
    info: &DomainInfo,
    carried: &Carried,
) -> Result<(), RestoreError> {
    let Some(intent) = host
        .read_intent(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?
    else {
        return Ok(());
    };
    let tpm_location = carried.tpm.as_ref().map(|(_, l)| l);
    let nvram_location = carried.nvram.as_ref();
    let here_tpm = intent
        .target
        .tpm
        .as_ref()
        .and(tpm_location)
        .map(StateLocation::path);
    let here_nvram = intent
        .target
        .nvram
        .as_ref()
        .and(nvram_location)
        .map(NvramLocation::path);
    if here_tpm != intent.tpm_at || here_nvram != intent.nvram_at {
        return Err(RestoreError::UnfinishedElsewhere {
            name: shown_name(&info.name),
            tpm: intent
                .tpm_at
                .map(|p| crate::logging::escaped(&p.to_string_lossy())),
            nvram: intent
                .nvram_at
                .map(|p| crate::logging::escaped(&p.to_string_lossy())),
            digest: intent.target.digest().short(),
        });
    }
    write_state(
        paths,
        &info.name,
        &intent.target,
        tpm_location,
        nvram_location,
    )?;
    host.record_sync(&info.uuid, &intent.target)
        .map_err(RestoreError::fs(&info.name))?;
    host.clear_intent(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    log::info!(
        "VM {} ({}): finished an interrupted restore (digest {}, {} bytes){}",
        shown_name(&info.name),
        info.uuid,
        intent.target.digest().short(),
        intent.target.total_size(),
        intent
            .backup
            .map(|b| format!("; the state it replaced is in {}", b.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// A fault point of the `fault-injection` test build (nothing otherwise).
fn fault(name: &str, point: &'static str) -> Result<(), RestoreError> {
    crate::fault::point(point).map_err(|source| RestoreError::Fs {
        name: shown_name(name),
        source: FsError::Io {
            action: "continue at",
            path: PathBuf::from(point),
            source,
        },
    })
}

/// Removes what an interrupted earlier run left beside the state dir, the
/// VARS file and in our own data for `uuid`. Call with the lock held.
pub fn remove_leftovers(
    host: &HostData,
    uuid: &DomainUuid,
    tpm: Option<&StateLocation>,
    nvram: Option<&NvramLocation>,
) {
    if let Some(l) = tpm {
        l.remove_leftovers();
    }
    if let Some(l) = nvram {
        l.remove_leftovers();
    }
    host.remove_leftovers(uuid);
}

/// swtpm reads an encrypted state only with the key, and a plain one only
/// without: a mismatch would start a TPM that fails, so refuse it here.
fn check_encryption(info: &DomainInfo, tpm: &TpmState, name: &str) -> Result<(), RestoreError> {
    let domain_encrypts = matches!(
        info.emulated_tpm().map(|t| &t.backend),
        Some(TpmBackend::Emulator {
            encryption_secret: Some(_),
            ..
        })
    );
    let state_encrypted = crate::swtpm::state_is_encrypted(tpm);
    match (state_encrypted, domain_encrypts) {
        (true, false) => Err(RestoreError::EncryptionMismatch {
            name: name.to_string(),
            state: "encrypted",
            domain: "has no <encryption secret=...>",
        }),
        (false, true) => Err(RestoreError::EncryptionMismatch {
            name: name.to_string(),
            state: "not encrypted",
            domain: "has <encryption secret=...>",
        }),
        _ => Ok(()),
    }
}
