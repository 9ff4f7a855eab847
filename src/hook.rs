//! The libvirt qemu hook: `virt-tpm-state-hook NAME OP SUBOP EXTRA`, domain
//! XML on stdin. Never calls libvirt (libvirt holds the domain's lock while
//! it waits for us), never prints to stdout (libvirt takes stdout of some ops
//! as a replacement domain XML).

use crate::carried::{carried, Carried};
use crate::config::{Config, ConfigError};
use crate::domain::{parse_domain, DomainInfo, DomainXmlError};
use crate::exit::Exit;
use crate::fs::{FsError, HostData};
use crate::name::DomainName;
use crate::paths::Paths;
use crate::restore::{prepare, PrepareOptions, RestoreError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Embedded in the hook binary so `install` can tell our hook from somebody
/// else's before replacing or removing a file in /etc/libvirt/hooks.
pub const HOOK_MARKER: &str = "virt-tpm-state-hook/marker/7f3a9c";

/// Largest domain XML read from stdin: libvirt's own limit is 4 MiB.
pub(crate) const MAX_STDIN: u64 = 8 * 1024 * 1024;

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
    Fs { name: DomainName, source: FsError },
}

impl HookError {
    /// Exit codes, documented in the README.
    pub fn exit_code(&self) -> Exit {
        match self {
            HookError::Usage => Exit::Usage,
            HookError::Stdin(_) | HookError::StdinTooLarge | HookError::DomainXml(_) => {
                Exit::DomainXml
            }
            HookError::Config(_) => Exit::Config,
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

/// The hook's arguments as libvirt passes them: `DOMAIN OP SUBOP EXTRA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookArgs<'a> {
    pub(crate) domain: &'a str,
    pub op: &'a str,
    pub subop: &'a str,
    /// libvirt always passes it (`-` for most ops); absent is accepted.
    pub(crate) extra: Option<&'a str>,
}

/// Parses argv (without the program name). Deliberately not clap: this runs
/// in every VM start, stop and migration, and the shape is fixed by libvirt.
/// Arguments after EXTRA are ignored. [`command`] describes the same shape
/// for the man page; a unit test keeps the two in agreement.
pub fn parse_args(args: &[String]) -> Result<HookArgs<'_>, HookError> {
    match args {
        [domain, op, subop, rest @ ..] => Ok(HookArgs {
            domain,
            op,
            subop,
            extra: rest.first().map(String::as_str),
        }),
        _ => Err(HookError::Usage),
    }
}

/// The hook's command line as a clap definition: never used to parse (see
/// [`parse_args`]), only to generate the virt-tpm-state-hook(8) man page.
pub fn command() -> clap::Command {
    use clap::{Arg, ArgAction, Command};
    let positional = |name: &'static str, help: &'static str| {
        Arg::new(name)
            .value_name(name)
            .required(true)
            .allow_hyphen_values(true)
            .help(help)
    };
    Command::new("virt-tpm-state-hook")
        .version(env!("CARGO_PKG_VERSION"))
        .about("libvirt qemu hook of virt-tpm-state: restore a VM's TPM state from its domain XML")
        .long_about(
            "libvirt runs this program as a qemu hook (installed by `virt-tpm-state install` as \
/etc/libvirt/hooks/qemu.d/virt-tpm-state), with the full domain XML on standard input. It is not \
meant to be run by hand.\n\n\
On `prepare begin` it restores the TPM state (and UEFI VARS) carried in the domain's \
<metadata> element (namespace urn:virt-tpm-state:1) into libvirt's state dir before libvirt \
starts swtpm, unless the local state is newer; a replaced local state is backed up first. On \
`stopped end` it keeps a copy of the final state, records the store as pending, and starts \
`virt-tpm-state store --after-stop` detached, which writes the state into the metadata through \
libvirt's API (what it cannot finish, the next `store`, `watch` or `sync --pending` completes). `migrate begin` and \
`restore begin` mark the domain so that its next prepare does not restore (the state travels with \
the VM); `release end` clears that mark, and with the shutoff reason `from snapshot` (libvirt \
>= 10.5: a snapshot revert stopped the VM) marks that the next start within 5 minutes takes the \
snapshot's state. Every other operation exits 0 at once.\n\n\
It never calls libvirt, never writes to standard output, and on failure prints one line on \
standard error (libvirt shows it as the reason the operation failed) and to syslog.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(positional("DOMAIN", "Domain name"))
        .arg(positional(
            "OP",
            "Operation: prepare, start, started, stopped, release, migrate, restore, reconnect, attach",
        ))
        .arg(positional("SUBOP", "Sub-operation: begin or end"))
        .arg(
            Arg::new("EXTRA")
                .value_name("EXTRA")
                .num_args(0..)
                .action(ArgAction::Append)
                .allow_hyphen_values(true)
                .trailing_var_arg(true)
                .help("libvirt's extra argument: '-', or the shutoff reason on `release end` (libvirt >= 10.5); later arguments are ignored"),
        )
}

/// Runs one hook invocation. `args` excludes the program name.
pub fn run(args: &[String], stdin: impl Read, paths: &Paths) -> Result<(), HookError> {
    let parsed = parse_args(args)?;
    let op = HookOp::from_args(parsed.op, parsed.subop);
    if op == HookOp::Ignored {
        return Ok(());
    }
    // `release end` only clears a marker: with none on the host (the common
    // case), there is nothing to read or parse.
    let from_snapshot = op == HookOp::Release && is_from_snapshot(parsed.extra);
    if op == HookOp::Release && !from_snapshot && !HostData::new(paths).any_incoming() {
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
            let name = info.name.clone();
            HostData::new(paths)
                .set_incoming(&info.uuid, what)
                .map_err(fs_of(&name))?;
            log::info!(
                "VM {name} ({}): {what} in progress, its TPM state travels with it; the next prepare will not restore",
                info.uuid
            );
            Ok(())
        }
        HookOp::Stopped => stopped(paths, &config, &xml),
        HookOp::Release => {
            let info = parse_domain(&xml, &config.namespace)?;
            let name = info.name.clone();
            let fs = fs_of(&name);
            let host = HostData::new(paths);
            host.clear_incoming(&info.uuid).map_err(fs)?;
            if from_snapshot && !carried(paths, &config, &info)?.is_empty() {
                // libvirt's own signal (>= 10.5) that a snapshot revert
                // stopped the VM: the prepare that follows (a revert that
                // starts it again) takes the snapshot's element.
                host.set_reverted(&info.uuid).map_err(fs)?;
                log::info!(
                    "VM {name} ({}): stopped by a snapshot revert; its next start within {} s takes the snapshot's TPM state",
                    info.uuid,
                    crate::fs::MARKER_TTL.as_secs()
                );
            }
            Ok(())
        }
        HookOp::Ignored => Ok(()),
    }
}

/// `release end`'s EXTRA is the shutoff reason since libvirt 10.5; a snapshot
/// revert that stops a running domain gives `from snapshot`.
fn is_from_snapshot(extra: Option<&str>) -> bool {
    matches!(extra, Some("from snapshot" | "from-snapshot"))
}

/// `stopped end`: swtpm has exited, the state is final. Keep a copy (libvirt
/// deletes the dir of a transient domain right after `release`), record the
/// store as pending, then hand it to the helper in a detached process.
fn stopped(paths: &Paths, config: &Config, xml: &[u8]) -> Result<(), HookError> {
    let info = parse_domain(xml, &config.namespace)?;
    let carried = carried(paths, config, &info)?;
    if carried.is_empty() {
        return Ok(());
    }
    let name = info.name.clone();
    let host = HostData::new(paths);
    {
        let _lock = host
            .lock(&info.uuid, Duration::from_secs(config.lock_timeout_secs))
            .map_err(fs_of(&name))?;
        crate::restore::remove_leftovers(
            &host,
            &info.uuid,
            carried.tpm.as_ref().map(|(_, l)| l),
            carried.nvram.as_ref(),
        );
        // A prepare killed mid-restore (libvirt runs `stopped` after a failed
        // prepare): finish it first, so the kept copy and the post-stop
        // store never see TPM and VARS of two generations.
        crate::restore::finish_intent(paths, &host, &info, &carried)?;
        keep_final_state(paths, config, &host, &info, &carried).map_err(fs_of(&name))?;
    }
    if config.store_after_stop {
        spawn_store(paths, config, &info.uuid, &name);
    }
    Ok(())
}

/// Under the lock at `stopped`: the TPM state and the VARS file together
/// become one kept copy, and a state the metadata does not hold yet (J)
/// a pending store.
fn keep_final_state(
    paths: &Paths,
    config: &Config,
    host: &HostData,
    info: &DomainInfo,
    carried: &Carried,
) -> Result<(), FsError> {
    let (tpm, nvram) = carried.sections();
    let max = config.max_file_size;
    let Some(state) = carried.read_live(tpm, nvram, max)? else {
        return Ok(());
    };
    let kept = carried.read_kept(host, &info.uuid, tpm, nvram, max)?;
    if kept.as_ref().map(|k| k.digest()) != Some(state.digest()) {
        crate::gc::enforce(paths, config, &info.uuid, state.total_size() as u64);
        host.write_kept(&info.uuid, &state)?;
        log::info!(
            "VM {} ({}): kept a copy of the final state (digest {}, {} bytes)",
            info.name.clone(),
            info.uuid,
            state.digest().short(),
            state.total_size()
        );
    }
    // Before anything talks to libvirt: the post-stop store may find
    // libvirt gone (host shutdown), be killed or time out, and whoever
    // runs next completes this record (`store::pending`). A state the
    // metadata already holds (J) needs no store.
    if config.store_after_stop && host.read_synced(&info.uuid)? != Some(state.digest()) {
        host.write_pending(&info.uuid, state.digest())?;
    }
    Ok(())
}

/// An `fs` failure of the hook, naming the VM.
fn fs_of(name: &DomainName) -> impl Fn(FsError) -> HookError + Copy + '_ {
    move |source| HookError::Fs {
        name: name.clone(),
        source,
    }
}

/// The helper the hook starts after a stop.
pub(crate) fn helper_path(config: &Config) -> Option<PathBuf> {
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
fn spawn_store(paths: &Paths, config: &Config, uuid: &crate::state::DomainUuid, name: &DomainName) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The man page's clap definition accepts exactly the argument lists the
    /// hook accepts, and reads the same DOMAIN, OP, SUBOP and EXTRA from them.
    #[test]
    fn man_page_command_matches_the_parser() {
        command().debug_assert();
        // Not "--": clap always reads it as its end-of-options marker, while
        // the hook takes every word literally (a domain named "--" is the
        // one case the generated synopsis does not describe).
        let words = [
            "vm1", "prepare", "begin", "-", "--help", "-h", "-x", "", "x y", "-V",
        ];
        let mut cases: Vec<Vec<String>> = vec![vec![]];
        // Every argument list of up to 3 words from `words`; of the longer
        // ones a deterministic stride (every 7th of 4, every 37th of 5).
        for len in 1..=5u32 {
            let total = words.len().pow(len);
            for n in (0..total).step_by(match len {
                4 => 7,
                5 => 37,
                _ => 1,
            }) {
                let mut v = Vec::new();
                let mut k = n;
                for _ in 0..len {
                    v.push(words[k % words.len()].to_string());
                    k /= words.len();
                }
                cases.push(v);
            }
        }
        // libvirt's real calls.
        for call in [
            ["vm1", "prepare", "begin", "-"],
            ["vm1", "release", "end", "shutdown"],
            ["-odd-name", "stopped", "end", "-"],
        ] {
            cases.push(call.iter().map(|s| s.to_string()).collect());
        }
        let cmd = command();
        let mut accepted = 0;
        for args in &cases {
            let ours = parse_args(args);
            let clap = cmd.clone().try_get_matches_from(
                std::iter::once("virt-tpm-state-hook".to_string()).chain(args.iter().cloned()),
            );
            match (&ours, &clap) {
                (Ok(a), Ok(m)) => {
                    accepted += 1;
                    let one = |id: &str| m.get_one::<String>(id).map(String::as_str);
                    assert_eq!(one("DOMAIN"), Some(a.domain), "{args:?}");
                    assert_eq!(one("OP"), Some(a.op), "{args:?}");
                    assert_eq!(one("SUBOP"), Some(a.subop), "{args:?}");
                    let extra = m
                        .get_many::<String>("EXTRA")
                        .and_then(|mut v| v.next())
                        .map(String::as_str);
                    assert_eq!(extra, a.extra, "{args:?}");
                }
                (Err(_), Err(_)) => {}
                _ => panic!(
                    "{args:?}: the hook says {:?}, the man page's definition says {:?}",
                    ours.map(|_| "accepted"),
                    clap.map(|_| "accepted").map_err(|e| e.kind())
                ),
            }
        }
        assert!(accepted > 100, "only {accepted} accepted cases");
    }
}
