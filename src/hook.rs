//! The libvirt qemu hook: `virt-tpm-state-hook NAME OP SUBOP EXTRA`, domain
//! XML on stdin. Never calls libvirt (libvirt holds the domain's lock while
//! it waits for us), never prints to stdout (libvirt takes stdout of some ops
//! as a replacement domain XML).

use crate::config::{Config, ConfigError};
use crate::domain::{parse_domain, DomainXmlError};
use crate::paths::Paths;
use crate::restore::{carried, prepare, shown_name, PrepareOptions, RestoreError};
use crate::statefs::{FsError, HostData};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Embedded in the hook binary so `install` can tell our hook from somebody
/// else's before replacing or removing a file in /etc/libvirt/hooks.
pub const HOOK_MARKER: &str = "virt-tpm-state-hook/marker/7f3a9c";

/// Largest domain XML read from stdin: libvirt's own limit is 4 MiB.
pub const MAX_STDIN: u64 = 8 * 1024 * 1024;

/// What the hook was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOp {
    Prepare,
    /// `migrate begin` / `restore begin`: the state arrives with the VM.
    Incoming(&'static str),
    Stopped,
    Release,
    /// Every other op: exit at once.
    Ignored,
}

impl HookOp {
    pub fn from_args(op: &str, subop: &str) -> Self {
        match (op, subop) {
            ("prepare", "begin") => HookOp::Prepare,
            ("migrate", "begin") => HookOp::Incoming("migrate"),
            ("restore", "begin") => HookOp::Incoming("restore"),
            ("stopped", "end") => HookOp::Stopped,
            ("release", "end") => HookOp::Release,
            _ => HookOp::Ignored,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "usage: virt-tpm-state-hook DOMAIN OP SUBOP EXTRA (run by libvirt, domain XML on stdin)"
    )]
    Usage,
    #[error("cannot read the domain XML from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("the domain XML on stdin is larger than {MAX_STDIN} bytes")]
    StdinTooLarge,
    #[error("{0}; fix or remove it")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    #[error("VM {name}: {source}")]
    Fs { name: String, source: FsError },
}

impl HookError {
    /// Exit codes, documented in the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            HookError::Usage => 2,
            HookError::Stdin(_) | HookError::StdinTooLarge | HookError::DomainXml(_) => 3,
            HookError::Config(_) => 10,
            HookError::Fs { source, .. } => source.exit_code(),
            HookError::Restore(r) => r.exit_code(),
        }
    }
}

fn read_stdin(stdin: impl Read) -> Result<Vec<u8>, HookError> {
    let mut buf = Vec::new();
    stdin
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(HookError::Stdin)?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(HookError::StdinTooLarge);
    }
    Ok(buf)
}

/// Runs one hook invocation. `args` excludes the program name.
pub fn run(args: &[String], stdin: impl Read, paths: &Paths) -> Result<(), HookError> {
    if args.len() < 3 {
        return Err(HookError::Usage);
    }
    let op = HookOp::from_args(&args[1], &args[2]);
    if op == HookOp::Ignored {
        return Ok(());
    }
    // `release end` only clears a marker: with none on the host (the common
    // case), there is nothing to read or parse.
    if op == HookOp::Release && !HostData::new(paths).any_incoming() {
        return Ok(());
    }
    let xml = read_stdin(stdin)?;
    let config = Config::load(paths)?;
    match op {
        HookOp::Prepare => {
            let report = prepare(paths, &config, &xml, PrepareOptions::default())?;
            log::info!("{}", report.summary());
            Ok(())
        }
        HookOp::Incoming(what) => {
            let info = parse_domain(&xml, &config.namespace)?;
            if carried(paths, &config, &info)?.is_empty() {
                return Ok(());
            }
            HostData::new(paths)
                .set_incoming(&info.uuid, what)
                .map_err(|source| HookError::Fs {
                    name: shown_name(&info.name),
                    source,
                })?;
            log::info!(
                "VM {} ({}): {what} in progress, its TPM state travels with it; the next prepare will not restore",
                shown_name(&info.name),
                info.uuid
            );
            Ok(())
        }
        HookOp::Stopped => stopped(paths, &config, &xml),
        HookOp::Release => {
            let info = parse_domain(&xml, &config.namespace)?;
            HostData::new(paths)
                .clear_incoming(&info.uuid)
                .map_err(|source| HookError::Fs {
                    name: shown_name(&info.name),
                    source,
                })
        }
        HookOp::Ignored => Ok(()),
    }
}

/// `stopped end`: swtpm has exited, the state is final. Keep a copy (libvirt
/// deletes the dir of a transient domain right after `release`), then hand
/// the store to the helper in a detached process.
fn stopped(paths: &Paths, config: &Config, xml: &[u8]) -> Result<(), HookError> {
    let info = parse_domain(xml, &config.namespace)?;
    let carried = carried(paths, config, &info)?;
    if carried.is_empty() {
        return Ok(());
    }
    let name = shown_name(&info.name);
    let fs = |source| HookError::Fs {
        name: name.clone(),
        source,
    };
    let host = HostData::new(paths);
    {
        let _lock = host
            .lock(&info.uuid, Duration::from_secs(config.lock_timeout_secs))
            .map_err(fs)?;
        crate::restore::remove_leftovers(
            &host,
            &info.uuid,
            carried.tpm.as_ref().map(|(_, l)| l),
            carried.nvram.as_ref(),
        );
        // The TPM state and the VARS file together: one kept copy.
        let Some(state) = carried
            .read_live(true, true, config.max_file_size)
            .map_err(fs)?
        else {
            return Ok(());
        };
        let kept = host
            .read_kept_state(
                &info.uuid,
                carried.tpm_version(),
                carried.nvram.is_some(),
                config.max_file_size,
            )
            .map_err(fs)?;
        if kept.as_ref().map(|k| k.digest()) != Some(state.digest()) {
            host.write_kept(&info.uuid, &state).map_err(fs)?;
            log::info!(
                "VM {name} ({}): kept a copy of the final state (digest {}, {} bytes)",
                info.uuid,
                state.digest().short(),
                state.total_size()
            );
        }
    }
    if config.store_after_stop {
        spawn_store(paths, config, &info.uuid, &name);
    }
    Ok(())
}

/// The helper the hook starts after a stop.
pub fn helper_path(config: &Config) -> Option<PathBuf> {
    if let Some(p) = &config.helper_path {
        return Some(p.clone());
    }
    ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join("virt-tpm-state"))
        .find(|p| p.is_file())
}

/// Starts `virt-tpm-state store --after-stop UUID` detached: no stdio, a
/// clean environment, not waited for. It becomes its own session leader and
/// waits until libvirt has let go of the domain. Failure to start it is
/// logged, never fatal: the copy kept above is the safety net.
fn spawn_store(paths: &Paths, config: &Config, uuid: &crate::state::DomainUuid, name: &str) {
    let Some(helper) = helper_path(config) else {
        log::warn!("VM {name}: no virt-tpm-state helper found to store the final TPM state; set helper_path in the config");
        return;
    };
    let mut cmd = Command::new(&helper);
    cmd.args(["store", "--after-stop", uuid.as_str()])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if paths.is_rerooted() {
        cmd.env(crate::paths::ROOT_ENV, paths.root());
    }
    if let Some(uri) = std::env::var_os("LIBVIRT_DEFAULT_URI") {
        cmd.env("LIBVIRT_DEFAULT_URI", uri);
    }
    match cmd.spawn() {
        Ok(child) => log::info!(
            "VM {name}: started {} (pid {}) to store the final TPM state",
            helper.display(),
            child.id()
        ),
        Err(e) => log::warn!("VM {name}: cannot start {}: {e}", helper.display()),
    }
}
