//! What a `prepare` did: the outcome, and its one line for logs.

use crate::decision::Why;
use crate::name::DomainName;
use crate::state::{DomainUuid, Sha256Sum};
use std::path::PathBuf;

/// What `prepare` did, for logs and the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrepareReport {
    pub(crate) name: DomainName,
    pub(crate) uuid: DomainUuid,
    pub(crate) outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
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
    pub(crate) fn summary(&self) -> String {
        let who = format!("VM {} ({})", self.name, self.uuid);
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
