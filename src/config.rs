//! The optional config file, `/etc/virt-tpm-state/config.toml`. Every key
//! has a default; a missing file means all defaults. Unknown keys are refused
//! so a typo does not silently change nothing.

use crate::decision::ConflictPolicy;
use crate::format::{DEFAULT_MAX_FILE_SIZE, NAMESPACE_URI};
use crate::paths::{Paths, CONFIG_FILE};

/// A config larger than this is not one of ours.
const MAX_CONFIG_SIZE: u64 = 1024 * 1024;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    /// Namespace URI of our metadata element.
    pub(crate) namespace: String,
    /// Largest decompressed size of one state file, in bytes.
    pub(crate) max_file_size: u64,
    /// `store` refuses a state whose domain XML would grow past this many
    /// bytes (libvirt's own limit for a domain XML is 4 MiB).
    pub(crate) max_domain_xml_size: u64,
    /// Replaced local states kept per domain under the backups directory.
    pub(crate) backups_per_domain: usize,
    /// What wins when the metadata and an unsynced local state differ.
    pub(crate) on_conflict: ConflictPolicy,
    /// After a VM stops, start `virt-tpm-state store` for it (detached).
    pub(crate) store_after_stop: bool,
    /// The CLI the hook starts for that; default: found next to the hook's
    /// install or in the usual bin directories.
    pub(crate) helper_path: Option<PathBuf>,
    /// Milliseconds between the two reads that must agree for a running
    /// domain's state to count as settled.
    pub(crate) settle_interval_ms: u64,
    /// Reads before `store` gives up on a state that keeps changing.
    pub(crate) settle_attempts: u32,
    /// Seconds to wait for another process working on the same domain.
    pub(crate) lock_timeout_secs: u64,
    /// Let `store` write plaintext state when the host has no key. Anyone
    /// who can read the domain XML (by default every local user, through a
    /// read-only connection) can then read the TPM's secrets.
    pub(crate) allow_plaintext: bool,
    /// Directories below which a domain XML's `<tpm><backend><source
    /// type='dir'|'file' path=...>`, `<nvram>` or `<varstore>` path may point (absolute). The XML
    /// is untrusted input: by default only libvirt's own dirs are written.
    pub(crate) state_path_prefixes: Vec<PathBuf>,
    /// Carry the domain's UEFI variable store (its `<nvram>` or
    /// `<varstore>` file) in the element beside the TPM state.
    pub(crate) nvram: bool,
    /// Also carry the variable store of UEFI domains without an emulated
    /// TPM (the element then holds NVRAM only).
    pub(crate) nvram_without_tpm: bool,
    /// `watch`: seconds between full reconciles (a safety net for anything
    /// inotify missed; between them an idle host costs nothing).
    pub(crate) reconcile_interval_secs: u64,
    /// `status` exits 20 when a domain has been out of sync longer than this.
    pub(crate) status_max_lag_secs: u64,
    /// Data of domains libvirt no longer knows is removed after this many
    /// days (garbage collection, `virt-tpm-state gc`).
    pub(crate) kept_retention_days: u64,
    /// Total size cap of our data dir, enforced before each new kept copy
    /// or backup (by removing data of domains libvirt no longer knows).
    pub(crate) max_state_dir_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: NAMESPACE_URI.to_string(),
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_domain_xml_size: 2 * 1024 * 1024,
            backups_per_domain: 5,
            on_conflict: ConflictPolicy::Metadata,
            store_after_stop: true,
            helper_path: None,
            settle_interval_ms: 1000,
            settle_attempts: 10,
            lock_timeout_secs: 30,
            allow_plaintext: false,
            state_path_prefixes: Vec::new(),
            nvram: true,
            nvram_without_tpm: false,
            reconcile_interval_secs: 300,
            status_max_lag_secs: 600,
            kept_retention_days: 30,
            max_state_dir_bytes: 1024 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config: {0}")]
    Read(crate::fs::FsError),
    #[error("{path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads the config file of `paths`, or the defaults when there is none.
    pub(crate) fn load(paths: &Paths) -> Result<Self, ConfigError> {
        let text = crate::fs::read_file(
            paths,
            &crate::fs::Anchor::Config,
            Path::new(CONFIG_FILE),
            MAX_CONFIG_SIZE,
        )
        .map_err(ConfigError::Read)?;
        let Some(text) = text else {
            return Ok(Config::default());
        };
        Self::parse(&String::from_utf8_lossy(&text)).map_err(|message| ConfigError::Invalid {
            path: paths.config_file(),
            message,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if c.max_file_size == 0 || c.settle_attempts < 2 || c.namespace.is_empty() {
            return Err(
                "max_file_size must be > 0, settle_attempts >= 2, namespace non-empty".into(),
            );
        }
        if c.reconcile_interval_secs == 0 {
            return Err("reconcile_interval_secs must be > 0".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config the package installs (dist/deb/config.toml) is all
    /// defaults, names every key, and each commented line, uncommented,
    /// is valid and holds the default (so the file documents the truth).
    #[test]
    fn packaged_config_documents_every_key_with_its_default() {
        let text = include_str!("../dist/deb/config.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
        // The keys the parser knows, from its own "unknown field" message.
        let err = Config::parse("no_such_key = 1").unwrap_err();
        let known: std::collections::BTreeSet<String> = err
            .split('`')
            .skip(3)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(known.len() >= 15, "cannot read the field list from {err:?}");
        let mut documented = std::collections::BTreeSet::new();
        for line in text.lines() {
            let Some(setting) = line.strip_prefix("# ") else {
                continue;
            };
            let Some((key, _)) = setting.split_once(" = ") else {
                continue;
            };
            let c = Config::parse(setting).unwrap_or_else(|e| panic!("{setting:?}: {e}"));
            if key == "helper_path" {
                // No default value: shown with the packaged path.
                assert_eq!(
                    c.helper_path.as_deref(),
                    Some(Path::new("/usr/bin/virt-tpm-state"))
                );
            } else {
                assert_eq!(c, Config::default(), "{setting:?} is not the default");
            }
            documented.insert(key.to_string());
        }
        assert_eq!(documented, known);
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse("backups_per_domain = 2\non_conflict = \"refuse\"\n").unwrap();
        assert_eq!(c.backups_per_domain, 2);
        assert_eq!(c.on_conflict, ConflictPolicy::Refuse);
    }

    #[test]
    fn typos_are_refused() {
        let e = Config::parse("backup_per_domain = 2").unwrap_err();
        assert!(e.contains("backup_per_domain"), "{e}");
        assert!(Config::parse("on_conflict = \"local\"").is_err());
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = Config::load(&Paths::with_root("/nonexistent")).unwrap();
        assert_eq!(c, Config::default());
    }
}
