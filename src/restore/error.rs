//! The errors of a restore. Everything after the domain XML was read is
//! about one VM: the code below works with [`ErrorKind`], which carries no
//! name, and the name is attached once, where an error leaves the use case
//! ([`ErrorKind::named`]). So no step re-wraps an error to say whose it is.

use crate::domain::DomainXmlError;
use crate::exit::Exit;
use crate::format::FormatError;
use crate::fs::FsError;
use crate::name::DomainName;
use crate::state::{DomainUuid, TpmVersion};

/// A restore refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    /// About the VM `name` (every message starts `VM 'name'`).
    #[error("{}", .kind.message(.name))]
    Vm { name: DomainName, kind: ErrorKind },
}

/// What went wrong for a VM, before its name is attached.
#[derive(Debug)]
pub enum ErrorKind {
    InvalidMetadata {
        ns: String,
        source: FormatError,
    },
    Key(FormatError),
    VersionMismatch {
        ns: String,
        metadata: TpmVersion,
        domain: TpmVersion,
    },
    UnknownTpmVersion(String),
    UnsupportedSource(String),
    Clone {
        uuid: DomainUuid,
        element_uuid: DomainUuid,
        ns: String,
    },
    Conflict {
        local: String,
        metadata: String,
    },
    EncryptionMismatch {
        state: &'static str,
        domain: &'static str,
    },
    Fs(FsError),
    UnfinishedElsewhere {
        tpm: Option<String>,
        nvram: Option<String>,
        digest: String,
    },
}

impl From<FsError> for ErrorKind {
    fn from(e: FsError) -> Self {
        ErrorKind::Fs(e)
    }
}

impl ErrorKind {
    /// The one place a VM's name joins its error.
    pub(crate) fn named(self, name: impl Into<DomainName>) -> RestoreError {
        RestoreError::Vm {
            name: name.into(),
            kind: self,
        }
    }

    /// The message, each naming the VM (and, where the fix is a command,
    /// naming it there too: the name is shown quoted, so it pastes).
    fn message(&self, name: &DomainName) -> String {
        use ErrorKind as K;
        match self {
            K::InvalidMetadata { ns, source } => format!("VM {name}: the TPM state in its metadata is invalid: {source}; nothing was written. Fix the XML, or remove the element with: virsh metadata {name} --uri {ns} --remove --config"),
            K::Key(source) => format!("VM {name}: cannot decrypt the TPM state in its metadata: {source}; nothing was written"),
            K::VersionMismatch { ns, metadata, domain } => format!("VM {name}: the metadata holds a TPM {metadata} state but the domain's TPM is version {domain}; nothing was written. Set <backend version='{metadata}'> or remove the element with: virsh metadata {name} --uri {ns} --remove --config"),
            K::UnknownTpmVersion(version) => format!("VM {name}: the TPM backend version {version:?} is not one this tool knows (1.2 or 2.0)"),
            K::UnsupportedSource(kind) => format!("VM {name}: TPM state stored as <source type={kind:?}> is not supported yet (only type='dir' and type='file'); remove the element or the <source>"),
            K::Clone { uuid, element_uuid, ns } => format!("VM {name} ({uuid}): the TPM state in its metadata belongs to domain {element_uuid} (a cloned XML?); nothing was written. For a fresh TPM remove it: virsh metadata {name} --uri {ns} --remove --config; to take that TPM over deliberately: virt-tpm-state adopt {name}"),
            K::Conflict { local, metadata } => format!("VM {name}: the local TPM state ({local}…) changed since it was last stored and differs from the metadata ({metadata}…), and on_conflict = \"refuse\"; nothing was written. Keep the local state: virt-tpm-state store {name}; take the metadata: virt-tpm-state restore --force {name}"),
            K::EncryptionMismatch { state, domain } => format!("VM {name}: the metadata state is {state} by swtpm but the domain's TPM {domain}; swtpm could not read it. Fix the <encryption> element or remove the metadata element"),
            K::Fs(source) => format!("VM {name}: {source}"),
            K::UnfinishedElsewhere { tpm, nvram, digest } => {
                let at = [tpm.as_deref(), nvram.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" and ");
                format!("VM {name}: an interrupted restore (digest {digest}…) into {at} must be finished first, but this XML names other state locations; nothing was written. Start it once with the XML naming those locations")
            }
        }
    }

    fn exit_code(&self) -> Exit {
        use ErrorKind as K;
        match self {
            K::Key(_) => Exit::Key,
            K::InvalidMetadata { .. }
            | K::VersionMismatch { .. }
            | K::UnknownTpmVersion(_)
            | K::UnsupportedSource(_)
            | K::EncryptionMismatch { .. } => Exit::InvalidElement,
            K::Clone { .. } => Exit::Clone,
            K::Conflict { .. } => Exit::Conflict,
            K::Fs(source) => source.exit_code(),
            K::UnfinishedElsewhere { .. } => Exit::Filesystem,
        }
    }
}

impl RestoreError {
    /// Exit codes shared by the hook and the CLI (README, "Exit codes").
    pub(crate) fn exit_code(&self) -> Exit {
        match self {
            RestoreError::DomainXml(_) => Exit::DomainXml,
            RestoreError::Vm { kind, .. } => kind.exit_code(),
        }
    }
}
