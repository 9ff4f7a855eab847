//! The `prepare` logic: decide, then restore the metadata state (or put the
//! kept copy back) into the state dir libvirt is about to use. The hook runs
//! it on `prepare begin`; `virt-tpm-state restore` runs the very same code
//! for a stopped domain. Never speaks to libvirt.

use crate::config::Config;
use crate::decision::{decide, Decision, DecisionInput, Refusal, Why};
use crate::domain::{parse_domain, DomainInfo, DomainXmlError, TpmBackend};
use crate::envelope::Keyring;
use crate::format::{decode_with_keys, DecodeLimits, FormatError, MetadataState, ENCODING_SEALED};
use crate::paths::Paths;
use crate::state::{DomainUuid, Sha256Sum, TpmState, TpmVersion};
use crate::statefs::{load_keyring, FsError, HostData, Owner, StateLocation};
use crate::swtpm::check_header;
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
    /// Wrote a state into the state dir.
    Restored {
        why: Why,
        digest: Sha256Sum,
        size: usize,
        location: PathBuf,
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
                format!(
                    "{who}: restored TPM state ({generation}digest {}, {size} bytes) into {}: {}{backup}",
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
    #[error("VM {name}: TPM state stored as <source type={kind:?}> is not supported yet (only type='dir'); remove the element or the <source>")]
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
}

impl RestoreError {
    /// Exit codes shared by the hook and the CLI (README, "Exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            RestoreError::DomainXml(_) => 3,
            RestoreError::Key { .. } => 19,
            RestoreError::InvalidMetadata { .. }
            | RestoreError::VersionMismatch { .. }
            | RestoreError::UnknownTpmVersion { .. }
            | RestoreError::UnsupportedSource { .. }
            | RestoreError::EncryptionMismatch { .. } => 4,
            RestoreError::Clone { .. } => 5,
            RestoreError::Conflict { .. } => 6,
            RestoreError::Fs { source, .. } => source.exit_code(),
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
    let mut s = String::from("'");
    for c in name.chars().take(200) {
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s.push('\'');
    s
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
    info: &DomainInfo,
    version: TpmVersion,
) -> Result<StateLocation, RestoreError> {
    let name = shown_name(&info.name);
    match info.emulated_tpm().map(|t| &t.backend) {
        Some(TpmBackend::Emulator {
            source: Some(src), ..
        }) => match src.kind.as_str() {
            "dir" => {
                StateLocation::from_source(paths, &src.path).map_err(RestoreError::fs(&info.name))
            }
            other => Err(RestoreError::UnsupportedSource {
                name,
                kind: other.to_string(),
            }),
        },
        _ => Ok(StateLocation::default_for(paths, &info.uuid, version)),
    }
}

/// The emulated TPM's version, if the domain has an emulated TPM.
pub fn domain_tpm_version(info: &DomainInfo) -> Result<Option<TpmVersion>, RestoreError> {
    match info.emulated_tpm().and_then(|t| t.version()) {
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
        .any(|f| f.attr("encoding") == Some(ENCODING_SEALED))
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
    decode_with_keys(
        el,
        DecodeLimits {
            max_file_size: config.max_file_size,
        },
        &keys,
    )
    .map(Some)
    .map_err(|source| match source {
        FormatError::MissingKey { .. } | FormatError::Decrypt { .. } => RestoreError::Key {
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
    let report = |outcome| PrepareReport {
        name: info.name.clone(),
        uuid: info.uuid.clone(),
        outcome,
    };
    let name = shown_name(&info.name);
    if info.metadata.is_none() {
        return Ok(report(Outcome::NotOurs(
            "no virt-tpm-state element in the metadata",
        )));
    }
    let Some(domain_version) = domain_tpm_version(info)? else {
        log::warn!(
            "VM {name}: the metadata holds TPM state but the domain has no emulated TPM; ignoring it"
        );
        return Ok(report(Outcome::NotOurs("the domain has no emulated TPM")));
    };
    let m = metadata_state(paths, info, config)?.expect("element present");
    if m.tpm.version != domain_version {
        return Err(RestoreError::VersionMismatch {
            name,
            ns: config.namespace.clone(),
            metadata: m.tpm.version,
            domain: domain_version,
        });
    }
    check_encryption(info, &m, &name)?;
    let location = state_location(paths, info, domain_version)?;
    // Links in the way are refused before anything is written or locked.
    location
        .check_safe()
        .map_err(RestoreError::fs(&info.name))?;

    let host = HostData::new(paths);
    let _lock = host
        .lock(&info.uuid, Duration::from_secs(config.lock_timeout_secs))
        .map_err(RestoreError::fs(&info.name))?;
    let max = config.max_file_size;
    let live = location
        .read(domain_version, max)
        .map_err(RestoreError::fs(&info.name))?;
    let kept = host
        .read_kept(&info.uuid, domain_version, max)
        .map_err(RestoreError::fs(&info.name))?;
    let journal = host
        .read_synced(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;
    let incoming = host
        .incoming(&info.uuid)
        .map_err(RestoreError::fs(&info.name))?;

    let mut decision = decide(&DecisionInput {
        domain_uuid: &info.uuid,
        metadata: Some((&m.provenance.uuid, m.digest)),
        journal,
        live: live.as_ref().map(TpmState::digest),
        kept: kept.as_ref().map(TpmState::digest),
        incoming,
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
    let shown_location = location.path();
    match decision {
        Decision::Nothing(why) => {
            if why == Why::AlreadyCurrent {
                host.record_sync(&info.uuid, &m.tpm)
                    .map_err(RestoreError::fs(&info.name))?;
            }
            Ok(report(Outcome::Unchanged {
                why,
                location: shown_location,
            }))
        }
        Decision::RestoreKept(why) => {
            let state = kept.expect("decided on a kept copy");
            location
                .replace(
                    state.files(),
                    Owner::swtpm(paths).map_err(RestoreError::fs(&info.name))?,
                )
                .map_err(RestoreError::fs(&info.name))?;
            if why == Why::AlreadyCurrent {
                host.record_sync(&info.uuid, &m.tpm)
                    .map_err(RestoreError::fs(&info.name))?;
            }
            Ok(report(Outcome::Restored {
                why,
                digest: state.digest(),
                size: state.total_size(),
                location: shown_location,
                backup: None,
                generation: None,
            }))
        }
        Decision::RestoreMetadata { backup_local, why } => {
            let owner = Owner::swtpm(paths).map_err(RestoreError::fs(&info.name))?;
            let mut backup = None;
            if backup_local {
                if let Some(local) = live.as_ref().or(kept.as_ref()) {
                    backup = Some(
                        host.backup(&info.uuid, local, config.backups_per_domain)
                            .map_err(RestoreError::fs(&info.name))?,
                    );
                }
            }
            location
                .replace(m.tpm.files(), owner)
                .map_err(RestoreError::fs(&info.name))?;
            host.record_sync(&info.uuid, &m.tpm)
                .map_err(RestoreError::fs(&info.name))?;
            Ok(report(Outcome::Restored {
                why,
                digest: m.digest,
                size: m.tpm.total_size(),
                location: shown_location,
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
    }
}

/// swtpm reads an encrypted state only with the key, and a plain one only
/// without: a mismatch would start a TPM that fails, so refuse it here.
fn check_encryption(info: &DomainInfo, m: &MetadataState, name: &str) -> Result<(), RestoreError> {
    let domain_encrypts = matches!(
        info.emulated_tpm().map(|t| &t.backend),
        Some(TpmBackend::Emulator {
            encryption_secret: Some(_),
            ..
        })
    );
    let state_encrypted = m.tpm.files().iter().any(|f| {
        check_header(&f.data)
            .map(|h| h.is_encrypted())
            .unwrap_or(false)
    });
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
