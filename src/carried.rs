//! What this host carries for a domain, and its local state: one rule for
//! every caller (the hook, `restore`, `store`, `show`, `status`, `watch`).
//!
//! What is carried comes from the domain XML and the config: the emulated
//! TPM (its version and where swtpm keeps its state) and the UEFI variable
//! store (a pflash VARS file or a `<varstore>` file), each confined to the
//! allowed anchors. The local state is read over the sections asked for:
//! the live files, else the copy kept at the domain's last stop, unless the
//! domain is known to run (see [`Carried::read_local`]).

use crate::config::Config;
use crate::domain::{DomainInfo, NvramSpec, TpmBackend};
use crate::fs::{FsError, HostData, NvramLocation, StateLocation};
use crate::paths::Paths;
use crate::restore::{ErrorKind, RestoreError};
use crate::state::{DomainUuid, MachineState, TpmVersion, VarsKind};
use std::path::PathBuf;

/// What the element carries for one domain on this host: its emulated TPM
/// (version and state dir) and/or its UEFI variable store. The same rule
/// decides what `store` writes and what the hook restores.
#[derive(Debug, Clone)]
pub(crate) struct Carried {
    pub(crate) tpm: Option<(TpmVersion, StateLocation)>,
    pub(crate) nvram: Option<NvramLocation>,
}

/// Whether the domain runs, for [`Carried::read_local`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Running {
    /// Running: its live state is the only local state; a copy kept at an
    /// earlier stop is older than it.
    Yes,
    /// Stopped: the copy kept at its last stop stands in for live files
    /// that libvirt removed (a transient domain) or that were moved away.
    No,
    /// Not known (a saved XML): as stopped, since a running domain's swtpm
    /// has its live state in place, which is read first.
    Unknown,
}

impl From<Option<bool>> for Running {
    fn from(active: Option<bool>) -> Self {
        match active {
            Some(true) => Running::Yes,
            Some(false) => Running::No,
            None => Running::Unknown,
        }
    }
}

impl Carried {
    /// What of the domain in `info` the element carries here, from its XML
    /// and the config (`nvram`, `nvram_without_tpm`).
    pub(crate) fn of(
        paths: &Paths,
        config: &Config,
        info: &DomainInfo,
    ) -> Result<Carried, ErrorKind> {
        let tpm = match tpm_version(info)? {
            Some(v) => Some((v, tpm_location(paths, config, info, v)?)),
            None => None,
        };
        let nvram = if config.nvram && (tpm.is_some() || config.nvram_without_tpm) {
            nvram_location(paths, config, info)?
        } else {
            None
        };
        Ok(Carried { tpm, nvram })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tpm.is_none() && self.nvram.is_none()
    }

    pub(crate) fn tpm_version(&self) -> Option<TpmVersion> {
        self.tpm.as_ref().map(|(v, _)| *v)
    }

    /// The sections (TPM, VARS) this domain carries here. "The local state
    /// matches the element" means: over exactly these, the element's
    /// digest is the local state's (`show`, `status`, `watch`). A section
    /// the element holds and the domain does not carry (VARS on a domain
    /// without UEFI) is not compared, and not restored; one the domain
    /// carries and the element lacks is a mismatch (the next store adds it).
    pub(crate) fn sections(&self) -> (bool, bool) {
        (self.tpm.is_some(), self.nvram.is_some())
    }

    /// The sections of the element's `state` that a restore here writes:
    /// those it holds and the domain carries. A variable store of the other
    /// kind (a pflash VARS file for a domain that now uses `<varstore>`, or
    /// the reverse) is not this domain's: its content means nothing to the
    /// other device.
    pub(crate) fn applicable(&self, state: &MachineState) -> (bool, bool) {
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
    pub(crate) fn read_live(
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

    /// The copy kept at the domain's last stop, over the same sections.
    pub(crate) fn read_kept(
        &self,
        host: &HostData,
        uuid: &DomainUuid,
        tpm: bool,
        nvram: bool,
        max: u64,
    ) -> Result<Option<MachineState>, FsError> {
        // Only the parts this domain carries here: a kept VARS file of a
        // domain that no longer has UEFI is not its local state.
        let nvram = nvram && self.nvram.is_some();
        host.read_kept_state(uuid, self.tpm_version().filter(|_| tpm), nvram, max)
    }

    /// The local state L over `tpm`/`nvram`: the live files, else (unless
    /// the domain is known to run) the copy kept at its last stop.
    /// The hook's `prepare` reads the two apart (the decision rule weighs
    /// each); everything else that asks "what is local" asks here.
    pub(crate) fn read_local(
        &self,
        host: &HostData,
        uuid: &DomainUuid,
        (tpm, nvram): (bool, bool),
        running: Running,
        max: u64,
    ) -> Result<Option<MachineState>, FsError> {
        match self.read_live(tpm, nvram, max)? {
            Some(live) => Ok(Some(live)),
            None if running != Running::Yes => self.read_kept(host, uuid, tpm, nvram, max),
            None => Ok(None),
        }
    }
}

/// [`Carried::of`], its error naming the VM (for callers outside a restore).
pub(crate) fn carried(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
) -> Result<Carried, RestoreError> {
    Carried::of(paths, config, info).map_err(|kind| kind.named(info.name.clone()))
}

/// Where the domain's swtpm state lives, from its `<tpm>` device.
pub(crate) fn state_location(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    version: TpmVersion,
) -> Result<StateLocation, RestoreError> {
    tpm_location(paths, config, info, version).map_err(|kind| kind.named(info.name.clone()))
}

/// The emulated TPM's version, if the domain has an emulated TPM.
pub(crate) fn domain_tpm_version(info: &DomainInfo) -> Result<Option<TpmVersion>, RestoreError> {
    tpm_version(info).map_err(|kind| kind.named(info.name.clone()))
}

pub(crate) fn tpm_version(info: &DomainInfo) -> Result<Option<TpmVersion>, ErrorKind> {
    match info
        .emulated_tpm()
        .and_then(|t| t.version_on(info.os.arch.as_deref()))
    {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(v)) => Err(ErrorKind::UnknownTpmVersion(v)),
    }
}

fn tpm_location(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
    version: TpmVersion,
) -> Result<StateLocation, ErrorKind> {
    let prefixes = &config.state_path_prefixes;
    match info.emulated_tpm().map(|t| &t.backend) {
        Some(TpmBackend::Emulator {
            source: Some(src), ..
        }) => match src.kind.as_str() {
            "dir" => Ok(StateLocation::from_source(paths, &src.path, prefixes)?),
            "file" => Ok(StateLocation::from_source_file(paths, &src.path, prefixes)?),
            other => Err(ErrorKind::UnsupportedSource(other.to_string())),
        },
        _ => Ok(StateLocation::default_for(paths, &info.uuid, version)),
    }
}

/// The domain's UEFI variable store, if it has one this tool can carry.
fn nvram_location(
    paths: &Paths,
    config: &Config,
    info: &DomainInfo,
) -> Result<Option<NvramLocation>, ErrorKind> {
    // A `<varstore>` (QEMU's uefi-vars JSON) replaces the pflash NVRAM:
    // libvirt allows only one of them per domain.
    let (spec, kind) = match info.os.varstore() {
        Some(spec) => (Some(spec), VarsKind::Varstore),
        None => (info.os.nvram(), VarsKind::Nvram),
    };
    Ok(match spec {
        None => None,
        Some(NvramSpec::Default) => {
            Some(NvramLocation::default_for(paths, info.name.as_str(), kind)?)
        }
        Some(NvramSpec::Path(p)) => {
            let libvirt_dir = match kind {
                VarsKind::Nvram => crate::paths::LIBVIRT_NVRAM_DIR,
                VarsKind::Varstore => crate::paths::LIBVIRT_VARSTORE_DIR,
            };
            let mut allowed = vec![PathBuf::from(libvirt_dir)];
            allowed.extend(config.state_path_prefixes.iter().cloned());
            Some(NvramLocation::from_path(paths, &p, &allowed, kind)?)
        }
        Some(NvramSpec::Unsupported(kind)) => {
            log::warn!(
                "VM {}: its <nvram type='{kind}'> is not a file; its UEFI variables are not carried",
                info.name.clone()
            );
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A UEFI-only domain's carried VARS file in a scratch root.
    fn scratch() -> (tempfile::TempDir, Paths, Carried) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let paths = Paths::with_root(t.path());
        let nvram = NvramLocation::default_for(&paths, "vm", VarsKind::Nvram).unwrap();
        let carried = Carried {
            tpm: None,
            nvram: Some(nvram),
        };
        (t, paths, carried)
    }

    fn uuid() -> DomainUuid {
        DomainUuid::parse("e9ed10eb-90aa-4aec-a226-1368ed64cf0f").unwrap()
    }

    /// The one local-state rule: live first; the kept copy stands in for
    /// absent live files unless the domain is known to run (its kept copy
    /// is then older than the state its swtpm and firmware hold).
    #[test]
    fn the_kept_copy_stands_in_unless_the_domain_runs() {
        let (_t, paths, carried) = scratch();
        let host = HostData::new(&paths);
        let kept = MachineState::new(None, Some(b"kept vars".to_vec()));
        host.write_kept(&uuid(), &kept).unwrap();
        let read = |running| {
            carried
                .read_local(&host, &uuid(), (false, true), running, 1 << 20)
                .unwrap()
                .map(|s| s.digest())
        };
        assert_eq!(read(Running::Yes), None);
        assert_eq!(read(Running::No), Some(kept.digest()));
        assert_eq!(read(Running::Unknown), Some(kept.digest()));

        let live_path = carried.nvram.as_ref().unwrap().path();
        let mut dir = live_path.parent().unwrap().to_path_buf();
        let mut missing = Vec::new();
        while !dir.exists() {
            missing.push(dir.clone());
            dir.pop();
        }
        for d in missing.iter().rev() {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(&live_path, b"live vars").unwrap();
        let live = MachineState::new(None, Some(b"live vars".to_vec()));
        for running in [Running::Yes, Running::No, Running::Unknown] {
            assert_eq!(read(running), Some(live.digest()), "{running:?}");
        }
    }

    /// A kept VARS file is not the local state of a domain that no longer
    /// carries UEFI here, even when the caller asks for every section.
    #[test]
    fn the_kept_copy_is_read_over_the_carried_parts_only() {
        let (_t, paths, _) = scratch();
        let host = HostData::new(&paths);
        let kept = MachineState::new(None, Some(b"kept vars".to_vec()));
        host.write_kept(&uuid(), &kept).unwrap();
        let bios = Carried {
            tpm: None,
            nvram: None,
        };
        let read = bios
            .read_local(&host, &uuid(), (true, true), Running::No, 1 << 20)
            .unwrap();
        assert_eq!(read.map(|s| s.digest()), None);
    }
}
