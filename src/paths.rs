//! Every absolute path the programs touch, re-rootable for tests.
//!
//! When `VIRT_TPM_STATE_ROOT=DIR` is set, each path below lives under `DIR`
//! instead of `/` (like systemd's `$SYSTEMD_*_ROOT` overrides), so the real
//! binaries run against a scratch tree. Nothing else reads the environment
//! for paths.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// libvirt's directory for VARS files (as the domain XML names it; re-rooted
/// by [`Paths::nvram_dir`]).
pub(crate) const LIBVIRT_NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";
/// libvirt's directory for `<varstore>` files (libvirt >= 12.1; re-rooted
/// by [`Paths::varstore_dir`]).
pub(crate) const LIBVIRT_VARSTORE_DIR: &str = "/var/lib/libvirt/qemu/varstore";
/// libvirt's default swtpm state base: `<base>/<uuid>/tpm2`.
pub(crate) const LIBVIRT_SWTPM_DIR: &str = "/var/lib/libvirt/swtpm";
/// libvirt's configuration (qemu.conf, hooks).
pub(crate) const LIBVIRT_CONFIG_DIR: &str = "/etc/libvirt";
/// Our configuration: config.toml, host keys.
pub(crate) const CONFIG_DIR: &str = "/etc/virt-tpm-state";
/// The config file's name in [`CONFIG_DIR`].
pub(crate) const CONFIG_FILE: &str = "config.toml";
/// Our root-only persistent data: backups, copies kept at stop, sync journal.
pub(crate) const DATA_DIR: &str = "/var/lib/virt-tpm-state";
/// Our volatile data: locks and "do not restore" markers.
pub(crate) const RUN_DIR: &str = "/run/virt-tpm-state";

/// Environment variable that re-roots every path.
pub(crate) const ROOT_ENV: &str = "VIRT_TPM_STATE_ROOT";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    root: PathBuf,
    /// `--keys DIR`: host keys from a directory the user names instead of
    /// `<config>/keys` (not re-rooted).
    keys_override: Option<PathBuf>,
    /// `--identity FILE`: an age identity (an owner's or escrow identity)
    /// tried besides this host's own (not re-rooted).
    identity_file: Option<PathBuf>,
}

impl Paths {
    /// Paths for this process: `/`, or the directory named by `VIRT_TPM_STATE_ROOT`.
    pub fn from_env() -> Self {
        Self::from_root_var(std::env::var_os(ROOT_ENV))
    }

    fn from_root_var(var: Option<OsString>) -> Self {
        match var {
            Some(v) if !v.is_empty() => Self::with_root(PathBuf::from(v)),
            _ => Self::with_root(PathBuf::from("/")),
        }
    }

    pub(crate) fn with_root(root: impl Into<PathBuf>) -> Self {
        Paths {
            root: root.into(),
            keys_override: None,
            identity_file: None,
        }
    }

    /// These paths with an extra age identity file (`--identity FILE`).
    pub(crate) fn with_identity_file(mut self, file: Option<PathBuf>) -> Self {
        self.identity_file = file;
        self
    }

    /// The identity file named with `--identity`, if any.
    pub(crate) fn identity_file(&self) -> Option<&Path> {
        self.identity_file.as_deref()
    }

    /// These paths with the host keys read from `dir` (`--keys DIR`).
    pub(crate) fn with_keys_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.keys_override = dir;
        self
    }

    /// The keys dir named with `--keys`, if any.
    pub(crate) fn keys_override(&self) -> Option<&Path> {
        self.keys_override.as_deref()
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn is_rerooted(&self) -> bool {
        self.root != Path::new("/")
    }

    /// `abs` (an absolute path) under the root.
    pub(crate) fn under_root(&self, abs: &Path) -> PathBuf {
        let rel = abs.strip_prefix("/").unwrap_or(abs);
        self.root.join(rel)
    }

    /// libvirt's default swtpm state base: `<base>/<uuid>/tpm2`.
    pub(crate) fn swtpm_base(&self) -> PathBuf {
        self.under_root(Path::new(LIBVIRT_SWTPM_DIR))
    }

    /// libvirt's default UEFI variable stores: `<dir>/<name>_VARS.fd`.
    pub(crate) fn nvram_dir(&self) -> PathBuf {
        self.under_root(Path::new(LIBVIRT_NVRAM_DIR))
    }

    /// libvirt's default `<varstore>` files: `<dir>/<name>.json`.
    pub(crate) fn varstore_dir(&self) -> PathBuf {
        self.under_root(Path::new(LIBVIRT_VARSTORE_DIR))
    }

    pub(crate) fn libvirt_hooks_dir(&self) -> PathBuf {
        self.under_root(Path::new(LIBVIRT_CONFIG_DIR)).join("hooks")
    }

    pub(crate) fn config_dir(&self) -> PathBuf {
        self.under_root(Path::new(CONFIG_DIR))
    }

    pub(crate) fn config_file(&self) -> PathBuf {
        self.config_dir().join(CONFIG_FILE)
    }

    /// Root-only persistent data: backups, copies kept at stop, sync journal.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.under_root(Path::new(DATA_DIR))
    }

    /// Volatile data: locks and "do not restore" markers.
    pub(crate) fn run_dir(&self) -> PathBuf {
        self.under_root(Path::new(RUN_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_is_slash() {
        let p = Paths::from_root_var(None);
        assert_eq!(p.swtpm_base(), PathBuf::from("/var/lib/libvirt/swtpm"));
        assert!(!p.is_rerooted());
        let p = Paths::from_root_var(Some(OsString::new()));
        assert_eq!(
            p.config_file(),
            PathBuf::from("/etc/virt-tpm-state/config.toml")
        );
    }

    #[test]
    fn every_path_is_rerooted() {
        let p = Paths::from_root_var(Some("/tmp/x".into()));
        for path in [
            p.swtpm_base(),
            p.nvram_dir(),
            p.varstore_dir(),
            p.libvirt_hooks_dir(),
            p.config_dir(),
            p.config_file(),
            p.data_dir(),
            p.run_dir(),
        ] {
            assert!(
                path.starts_with("/tmp/x/"),
                "{} not re-rooted",
                path.display()
            );
        }
        assert_eq!(
            p.under_root(Path::new("/srv/tpm")),
            PathBuf::from("/tmp/x/srv/tpm")
        );
    }
}
