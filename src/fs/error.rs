//! The filesystem layer's one error type.

use crate::exit::Exit;
use crate::state::DomainUuid;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path} is {what}; refusing to touch it (never follows or writes through links)")]
    Unsafe { path: PathBuf, what: &'static str },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("TPM state path {path:?} from the domain XML is not usable: {why}")]
    BadSourcePath { path: String, why: &'static str },
    #[error("another virt-tpm-state process has held the lock of {uuid} for {secs}s; try again, or look for a stuck process holding {lock}")]
    LockTimeout {
        uuid: DomainUuid,
        secs: u64,
        lock: PathBuf,
    },
    #[error("user or group {0:?} from qemu.conf does not exist on this host")]
    UnknownOwner(String),
    #[error("TPM state file {path} is not a swtpm state file virt-tpm-state can read ({source}); it was left untouched: keep a copy of it before changing anything")]
    Linear {
        path: PathBuf,
        source: crate::linear::LinearError,
    },
    #[error("libvirt's UEFI variable directory {path} does not exist (libvirtd creates it when it starts): restart libvirtd, then start the VM again; nothing was written")]
    NvramDirMissing { path: PathBuf },
    #[error("{path} holds more than {limit} entries; stopped removing it (something keeps adding to it?): remove it by hand with rm -rf")]
    TooManyEntries { path: PathBuf, limit: usize },
    #[error("{path} is writable by a user other than root ({what}); refusing to use the keys in it: chown root:root {path} && chmod 700 {path}")]
    UnsafeKeysDir { path: PathBuf, what: &'static str },
    #[error(
        "recipients file {0}; fix or remove that line (one age1… recipient per line, # comments)"
    )]
    BadRecipients(Box<crate::recipients::RecipientsError>),
}

impl From<crate::recipients::RecipientsError> for FsError {
    fn from(e: crate::recipients::RecipientsError) -> Self {
        FsError::BadRecipients(Box::new(e))
    }
}

impl FsError {
    /// Unsafe path, lock timeout, or any other filesystem failure.
    pub(crate) fn exit_code(&self) -> Exit {
        match self {
            // A file that is not swtpm's where a state file goes is in the
            // way like a link is: refused, left alone.
            FsError::Unsafe { .. }
            | FsError::BadSourcePath { .. }
            | FsError::Linear { .. }
            | FsError::UnsafeKeysDir { .. } => Exit::UnsafePath,
            FsError::LockTimeout { .. } => Exit::LockTimeout,
            FsError::BadRecipients(_) => Exit::Config,
            _ => Exit::Filesystem,
        }
    }

    pub(crate) fn unsafe_path(path: impl Into<PathBuf>, what: &'static str) -> Self {
        FsError::Unsafe {
            path: path.into(),
            what,
        }
    }

    /// True for "does not exist".
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, FsError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

pub(crate) fn io_err(action: &'static str, path: &Path, e: impl Into<std::io::Error>) -> FsError {
    FsError::Io {
        action,
        path: path.to_path_buf(),
        source: e.into(),
    }
}
