//! The `virt-tpm-state` command line: argument definitions (clap), one
//! function per subcommand, and the error type that maps every failure to a
//! documented exit code. The binary only calls [`main`].

mod install;
mod keys;
mod pack;
mod show;
mod snapshot;
mod status;
mod store;

use crate::config::{Config, ConfigError};
use crate::domain::DomainXmlError;
use crate::exit::Exit;
use crate::format::FormatError;
use crate::fs::FsError;
use crate::libvirt::{LibvirtError, DEFAULT_URI};
use crate::paths::Paths;
use crate::restore::RestoreError;
use crate::store::StoreError;
use crate::watch::WatchError;
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "virt-tpm-state",
    version,
    about = "Keep a libvirt VM's emulated TPM state inside its domain XML",
    long_about = "Keep a libvirt VM's emulated TPM (swtpm) state inside its domain XML <metadata>, \
so that dumpxml/undefine/define, or defining the XML on another host, keeps the same TPM.\n\n\
The hook (virt-tpm-state-hook, put in place by `install`) restores the state before libvirt \
starts swtpm; `store` writes the settled state back into the metadata through libvirt's API."
)]
pub(crate) struct Cli {
    /// libvirt connection URI, like virsh's -c
    #[arg(short = 'c', long = "connect", global = true, env = "LIBVIRT_DEFAULT_URI", default_value = DEFAULT_URI)]
    pub(crate) uri: String,
    /// Open a read-only connection, like virsh -r (enough for `show`; `store` needs read-write)
    #[arg(short = 'r', long, global = true)]
    pub(crate) readonly: bool,
    /// More output (-v: info, -vv: debug); logs go to stderr
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// Read host keys from DIR instead of /etc/virt-tpm-state/keys (commands that open or seal
    /// elements; DIR must be yours or root's and not group/other-writable, key files 0600)
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) keys: Option<PathBuf>,
    /// Also open elements sealed for recipients with this age identity file (an owner's or
    /// escrow identity; yours or root's, mode 0600), besides this host's own
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) identity: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Store the domain's settled TPM state into its metadata
    Store(StoreArgs),
    /// Show what the domain's metadata holds
    Show(ShowArgs),
    /// Check the metadata element; exit non-zero when it is absent or invalid
    Verify(VerifyArgs),
    /// Restore the metadata state into the state dir of a stopped domain (what the hook does on start)
    Restore(RestoreArgs),
    /// Write the raw state files out of a saved domain XML
    Extract(ExtractArgs),
    /// Take over a TPM state whose element names another domain (a deliberate clone)
    Adopt(DomainArg),
    /// Build an element offline (no libvirt) from a state dir, permall, linear or oVirt file, or this host's kept copy
    Pack(Box<PackArgs>),
    /// Create a new host key in /etc/virt-tpm-state/keys (new stores use the newest key)
    Keygen,
    /// Re-protect the metadata of a domain (or --all): re-wrap for the current recipients, or re-encrypt with the newest host key
    Rekey(RekeyArgs),
    /// Print this host's age recipient (a line for recipients.d); `host-id init` creates its identity
    HostId(HostIdArgs),
    /// Install the hook into /etc/libvirt/hooks and make libvirt see it
    Install(InstallArgs),
    /// Remove the hook installed by `install` (keeps backups, copies and metadata)
    Uninstall(InstallArgs),
    /// Keep running VMs' metadata in step with their TPM state (a service; logs to syslog, with -v to stderr)
    Watch,
    /// Per domain: metadata generation and age, whether the local state matches; exit 20 when out of sync too long
    Status(StatusArgs),
    /// Snapshots that keep the TPM state and UEFI variables with the disks (drop-ins for virsh)
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Remove kept copies, backups and sync records of domains libvirt no longer knows (after kept_retention_days, or over max_state_dir_bytes)
    Gc(GcArgs),
    /// Complete post-stop stores that could not finish (libvirt was gone, the store was killed); for hosts without the watch daemon, run at boot
    Sync(SyncArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// Complete the pending post-stop stores (`status` lists them); the only mode so far, so required
    #[arg(long, required = true)]
    pub(crate) pending: bool,
    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// `virsh snapshot-revert` that also brings back the snapshot's TPM state and VARS at the next start (the replaced state is backed up)
    Revert(SnapshotArgs),
    /// Store the current TPM state (a running VM paused meanwhile), then `virsh snapshot-create-as`
    Create(SnapshotArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SnapshotArgs {
    /// Domain name or UUID
    pub(crate) domain: String,
    /// Snapshot name
    pub(crate) snapshot: String,
    /// Further virsh options, passed through (e.g. --running, --force; --disk-only, --memspec ...)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "VIRSH_OPTIONS"
    )]
    pub(crate) virsh_args: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Say what would be removed, remove nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON for monitoring
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds out of sync before exiting 20 (default: status_max_lag_secs from the config)
    #[arg(long, value_name = "SECS")]
    pub(crate) max_lag: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct DomainArg {
    /// Domain name or UUID
    pub(crate) domain: String,
}

#[derive(Debug, Args)]
pub(crate) struct RekeyArgs {
    /// Domain name or UUID
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) domain: Option<String>,
    /// Every domain whose metadata holds TPM state
    #[arg(long)]
    pub(crate) all: bool,
    /// Also re-encrypt elements sealed for recipients with fresh file keys (not only re-wrap them)
    #[arg(long)]
    pub(crate) rotate: bool,
    /// Convert elements sealed with a host key (or plaintext) to the recipient set
    #[arg(long)]
    pub(crate) to_recipients: bool,
}

#[derive(Debug, Args)]
pub(crate) struct HostIdArgs {
    /// `init`: first create this host's age identity (/etc/virt-tpm-state/host-identity.txt, 0600; never overwrites one)
    #[arg(value_parser = ["init"])]
    pub(crate) action: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// Domain name or UUID
    pub(crate) domain: String,
    /// Print the result as JSON
    #[arg(long)]
    pub(crate) json: bool,
    /// Store plaintext when this host has no key (anyone who can read the XML can read the TPM)
    #[arg(long)]
    pub(crate) allow_plaintext: bool,
    /// Run by the hook after a stop: wait for libvirt to release the domain, log to syslog
    #[arg(long, hide = true)]
    pub(crate) after_stop: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SourceArgs {
    /// Domain name or UUID (read through libvirt)
    #[arg(required_unless_present = "xml", conflicts_with = "xml")]
    pub(crate) domain: Option<String>,
    /// Read a saved domain XML instead ("-" for stdin)
    #[arg(long, value_name = "FILE")]
    pub(crate) xml: Option<PathBuf>,
    /// With a domain: read the persistent definition (dumpxml --inactive)
    #[arg(long)]
    pub(crate) inactive: bool,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// Print the `show --json` object (docs/JSON.md)
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// Print JSON for managers
    #[arg(long)]
    pub(crate) json: bool,
    /// Exit non-zero when the element is absent or invalid (same as `verify`)
    #[arg(long)]
    pub(crate) check: bool,
    /// Show the element inside the domain's snapshot NAME (virDomainSnapshotGetXMLDesc), and
    /// whether it was the current TPM state when the snapshot was taken
    #[arg(long, value_name = "NAME", requires = "domain", conflicts_with_all = ["xml", "inactive"])]
    pub(crate) snapshot: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    /// Take the metadata state even over a newer local state (the local one is backed up)
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ExtractArgs {
    /// Saved domain XML ("-" for stdin)
    #[arg(long, value_name = "FILE")]
    pub(crate) xml: PathBuf,
    /// Directory to write the files into (created if missing; existing files are not overwritten)
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Extract even what `verify` refuses for this domain (another domain's uuid, a TPM version or encryption mismatch)
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PackArgs {
    /// The domain's UUID (the element is bound to it)
    #[arg(long, value_name = "UUID")]
    pub(crate) uuid: Option<String>,
    /// A swtpm state dir holding tpm2-00.permall or tpm-00.permall (or its tpm2/ or tpm1.2/ subdir)
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// A swtpm permall file (tpm2-00.permall, tpm-00.permall, or another name with --tpm-version)
    #[arg(long, value_name = "FILE")]
    pub(crate) permall: Option<PathBuf>,
    /// swtpm's linear state file (<source type='file'>, Proxmox's tpmstate volume)
    #[arg(long, value_name = "FILE")]
    pub(crate) linear: Option<PathBuf>,
    /// oVirt's form: base64 of a tar.xz of the swtpm state dir ("-" for stdin)
    #[arg(long, value_name = "FILE")]
    pub(crate) ovirt: Option<PathBuf>,
    /// This host's copy kept at the domain's last stop (the final state of a transient domain)
    #[arg(long, value_name = "UUID")]
    pub(crate) kept: Option<String>,
    /// A UEFI variable store (VARS file) to carry beside the TPM
    #[arg(long, value_name = "FILE")]
    pub(crate) vars: Option<PathBuf>,
    /// TPM version of the state (default: from the file name; 2.0 for a linear file)
    #[arg(long, value_name = "VERSION")]
    pub(crate) tpm_version: Option<String>,
    /// Seal with this host key (its id, 16 hex digits; see --keys)
    #[arg(long, value_name = "ID", conflicts_with = "plaintext")]
    pub(crate) key: Option<String>,
    /// Write the state unencrypted (anyone who can read the XML can read the TPM)
    #[arg(long)]
    pub(crate) plaintext: bool,
    /// generation attribute (default: 1, or with --into over an element, its generation + 1)
    #[arg(long, value_name = "N")]
    pub(crate) generation: Option<u64>,
    /// parent attribute: digest of the state this one follows (default: none, or with --into the replaced element's digest)
    #[arg(long, value_name = "HEX")]
    pub(crate) parent: Option<String>,
    /// stored attribute, RFC 3339 UTC (default: now)
    #[arg(long, value_name = "TIME")]
    pub(crate) stored: Option<String>,
    /// host attribute (default: this host's name)
    #[arg(long, value_name = "NAME")]
    pub(crate) host: Option<String>,
    /// Print this domain XML with the element in its <metadata> (replacing one there) instead of the element ("-" for stdin)
    #[arg(long, value_name = "DOMAIN.xml")]
    pub(crate) into: Option<PathBuf>,
    /// Print the element as `store` passes it to virDomainSetMetadata (no prefix, no namespace,
    /// compact; key "vts", uri "urn:virt-tpm-state:1"), byte for byte
    #[arg(long, conflicts_with = "into")]
    pub(crate) bare: bool,
    /// Print JSON (docs/JSON.md)
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    /// Install as /etc/libvirt/hooks/qemu (only if no other hook is there) instead of qemu.d/
    #[arg(long)]
    pub(crate) as_qemu: bool,
    /// Name of the hook in /etc/libvirt/hooks/qemu.d/
    #[arg(long, default_value = "virt-tpm-state")]
    pub(crate) name: String,
    /// The hook binary to install (default: virt-tpm-state-hook next to this program)
    #[arg(long, value_name = "PATH")]
    pub(crate) hook: Option<PathBuf>,
    /// Do not signal libvirtd/virqemud; print what to run instead
    #[arg(long)]
    pub(crate) no_reload: bool,
    /// Do not install and enable the watch daemon's systemd unit
    #[arg(long)]
    pub(crate) no_watch: bool,
}

/// The CLI's clap definition, for generated man pages and shell completions
/// (tools/src/gen_docs.rs): generated from the parser itself, so they cannot
/// drift from what the program accepts.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Every way the CLI fails, each with its exit code (README, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot read the domain XML: {0}")]
    DomainXml(#[from] DomainXmlError),
    #[error("{context}: the TPM state element is invalid: {source}")]
    InvalidElement {
        context: String,
        source: FormatError,
    },
    #[error("{0}")]
    NoElement(String),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {name}: {why}")]
    NoTpm { name: String, why: String },
    #[error(
        "VM {0} is running; `restore` only works on a stopped domain (the hook restores on start)"
    )]
    Running(String),
    #[error("VM {name}: cannot learn whether it runs: {source}; nothing was written (a running VM's swtpm would keep its state over the restored one). Retry once libvirt answers, or add --force if you know it is stopped")]
    CannotTellRunning { name: String, source: LibvirtError },
    #[error("{0}")]
    HookConflict(String),
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    OutOfSync(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Watch(#[from] WatchError),
}

impl CliError {
    /// The stable error kind of docs/JSON.md (`{"error": {"kind", …}}`).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            CliError::Usage(_) => "usage",
            CliError::DomainXml(_) => "domain-xml",
            CliError::ReadInput { .. } => "input",
            CliError::InvalidElement { .. } if self.exit_code() == Exit::Key => "key",
            CliError::InvalidElement { .. } => "invalid-element",
            CliError::NoElement(_) => "no-element",
            CliError::Restore(r) => restore_kind(r),
            CliError::Fs(e) => fs_kind(e),
            CliError::Config(_) => "config",
            CliError::Libvirt(e) => libvirt_kind(e),
            CliError::NoTpm { .. } => "no-tpm",
            CliError::Running(_) => "running",
            CliError::HookConflict(_) => "foreign-hook",
            CliError::Key(_) => "key",
            CliError::OutOfSync(_) => "out-of-sync",
            CliError::Store(e) => store_kind(e),
            CliError::Watch(WatchError::Setup(_)) => "usage",
            CliError::Watch(WatchError::Fs(e)) => fs_kind(e),
            CliError::CannotTellRunning { source, .. } => libvirt_kind(source),
        }
    }

    /// `{"error": {"kind", "exit", "message"}}` (docs/JSON.md).
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": error_member(self.kind(), self.exit_code(), &format!("virt-tpm-state: {self}"))
        })
    }

    pub(crate) fn exit_code(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::DomainXml(_) | CliError::ReadInput { .. } => Exit::DomainXml,
            CliError::InvalidElement { source, .. } => source.exit_code(),
            CliError::NoElement(_) => Exit::InvalidElement,
            // Same codes as the hook, from the same error types.
            CliError::Restore(r) => r.exit_code(),
            CliError::Fs(e) => e.exit_code(),
            CliError::Config(_) => Exit::Config,
            CliError::Libvirt(e) | CliError::CannotTellRunning { source: e, .. } => libvirt_exit(e),
            CliError::NoTpm { .. } => Exit::NoTpm,
            CliError::Running(_) => Exit::Running,
            CliError::HookConflict(_) => Exit::ForeignHook,
            CliError::Key(_) => Exit::Key,
            CliError::OutOfSync(_) => Exit::OutOfSync,
            CliError::Store(e) => store_exit(e),
            CliError::Watch(WatchError::Setup(_)) => Exit::Usage,
            CliError::Watch(WatchError::Fs(e)) => e.exit_code(),
        }
    }
}

/// The kind of a store's failure (the same kinds as the CLI's own).
fn store_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Libvirt(e) => libvirt_kind(e),
        StoreError::Restore(r) => restore_kind(r),
        StoreError::DomainXml(_) => "domain-xml",
        StoreError::Fs(e) => fs_kind(e),
        StoreError::NoTpm { .. } => "no-tpm",
        StoreError::StillChanging { .. } => "not-settled",
        StoreError::TooLarge { .. } => "too-large",
        StoreError::GenerationExhausted { .. } => "generation-exhausted",
        StoreError::Key(_) => "key",
    }
}

fn store_exit(e: &StoreError) -> Exit {
    match e {
        StoreError::Libvirt(e) => libvirt_exit(e),
        StoreError::Restore(r) => r.exit_code(),
        StoreError::DomainXml(_) => Exit::DomainXml,
        StoreError::Fs(e) => e.exit_code(),
        StoreError::NoTpm { .. } => Exit::NoTpm,
        StoreError::StillChanging { .. } => Exit::StillChanging,
        StoreError::TooLarge { .. } => Exit::TooLarge,
        StoreError::GenerationExhausted { .. } => Exit::InvalidElement,
        StoreError::Key(_) => Exit::Key,
    }
}

/// One kind per libvirt failure, wherever it is met.
fn libvirt_kind(e: &LibvirtError) -> &'static str {
    match e {
        LibvirtError::Connect { .. } => "connect",
        LibvirtError::NoDomain(_) => "no-domain",
        LibvirtError::Denied { .. } => "denied",
        LibvirtError::Call { .. } => "libvirt",
    }
}

/// One code per libvirt failure, wherever it is met.
fn libvirt_exit(e: &LibvirtError) -> Exit {
    match e {
        LibvirtError::Connect { .. } => Exit::LibvirtUnreachable,
        LibvirtError::NoDomain(_) => Exit::NoDomain,
        LibvirtError::Denied { .. } => Exit::Denied,
        LibvirtError::Call { .. } => Exit::LibvirtFailed,
    }
}

/// The kind of a refusal shared with the hook.
pub(crate) fn restore_kind(r: &RestoreError) -> &'static str {
    use crate::restore::ErrorKind as K;
    let RestoreError::Vm { kind, .. } = r else {
        return "domain-xml";
    };
    match kind {
        K::Key(_) => "key",
        K::InvalidMetadata { .. } => "invalid-element",
        K::VersionMismatch { .. } | K::UnknownTpmVersion(_) => "tpm-version",
        K::EncryptionMismatch { .. } => "swtpm-encryption",
        K::UnsupportedSource(_) => "unsupported-source",
        K::Clone { .. } => "clone",
        K::Conflict { .. } => "conflict",
        K::UnfinishedElsewhere { .. } => "unfinished-restore",
        K::Fs(source) => fs_kind(source),
    }
}

/// `{kind, exit, message}`: the member of `{"error": …}`.
pub(crate) fn error_member(kind: &str, exit: Exit, message: &str) -> serde_json::Value {
    serde_json::json!({ "kind": kind, "exit": exit.code(), "message": message })
}

fn fs_kind(e: &FsError) -> &'static str {
    match e.exit_code() {
        Exit::UnsafePath => "unsafe-path",
        Exit::LockTimeout => "lock-timeout",
        Exit::Config => "config",
        _ => "filesystem",
    }
}

/// Set once a command has printed its JSON object on stdout, whose
/// `error` member then already carries the failure (`show`, `verify`).
pub(crate) static JSON_PRINTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

use crate::context::Ctx;

/// Entry point of the `virt-tpm-state` binary.
pub fn main() -> ExitCode {
    // Nothing this process creates is ever more open than it sets it.
    crate::fs::restrict_umask();
    crate::logging::install_panic_hook("virt-tpm-state");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() && std::env::args().any(|a| a == "--json") {
                let rendered = e.render().to_string();
                let first = rendered.lines().next().unwrap_or("usage error");
                let err = CliError::Usage(first.trim_start_matches("error: ").to_string());
                out(&format!("{}\n", err.json()));
            }
            e.exit()
        }
    };
    let json = match &cli.command {
        Command::Show(a) => a.json,
        Command::Verify(a) => a.json,
        Command::Store(a) => a.json,
        Command::Status(a) => a.json,
        Command::Pack(a) => a.json,
        Command::Sync(a) => a.json,
        _ => false,
    };
    let after_stop = matches!(&cli.command, Command::Store(s) if s.after_stop);
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    if after_stop {
        // Detached from the hook: syslog only (stdio is /dev/null).
        crate::logging::init(
            "virt-tpm-state",
            log::LevelFilter::Info,
            log::LevelFilter::Warn,
        );
    } else if matches!(cli.command, Command::Watch) && cli.verbose == 0 {
        // The daemon: syslog (the journal), stderr when syslog is unreachable.
        crate::logging::init(
            "virt-tpm-state",
            log::LevelFilter::Info,
            log::LevelFilter::Info,
        );
    } else {
        init_stderr_logger(level);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if after_stop {
                // Detached: stderr is /dev/null, syslog is the only reader.
                crate::logging::report_error(&format!("virt-tpm-state: {e}"));
            } else {
                eprintln!(
                    "virt-tpm-state: {}",
                    crate::logging::escaped(&e.to_string())
                );
                if json && !JSON_PRINTED.load(std::sync::atomic::Ordering::SeqCst) {
                    out(&format!("{}\n", e.json()));
                }
            }
            e.exit_code().into()
        }
    }
}

fn init_stderr_logger(level: log::LevelFilter) {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                eprintln!(
                    "{}: {}",
                    r.level().as_str().to_lowercase(),
                    crate::logging::escaped(&r.args().to_string())
                );
            }
        }
        fn flush(&self) {}
    }
    let _ = log::set_logger(&Stderr);
    log::set_max_level(level);
}

pub(crate) fn run(cli: Cli) -> Result<(), CliError> {
    if (cli.keys.is_some() || cli.identity.is_some())
        && matches!(
            cli.command,
            Command::Keygen
                | Command::HostId(_)
                | Command::Install(_)
                | Command::Uninstall(_)
                | Command::Status(_)
        )
    {
        return Err(CliError::Usage(
            "--keys and --identity apply to commands that open or seal an element (show, verify, extract, restore, store, adopt, rekey, pack, watch)".into(),
        ));
    }
    let paths = Paths::from_env()
        .with_keys_dir(cli.keys.clone())
        .with_identity_file(cli.identity.clone());
    // `uninstall` uses nothing from the config, and a broken config must not
    // keep the hook wired (the Debian package's prerm runs it on removal).
    let config = if matches!(cli.command, Command::Uninstall(_)) {
        Config::default()
    } else {
        Config::load(&paths)?
    };
    let ctx = Ctx {
        paths,
        config,
        uri: cli.uri,
        readonly: cli.readonly,
    };
    match cli.command {
        Command::Store(a) => store::store(&ctx, &a),
        Command::Show(a) => show::show(&ctx, &a),
        Command::Verify(a) => show::show(
            &ctx,
            &ShowArgs {
                source: a.source,
                json: a.json,
                check: true,
                snapshot: None,
            },
        ),
        Command::Restore(a) => show::restore(&ctx, &a),
        Command::Extract(a) => show::extract(&ctx, &a),
        Command::Adopt(a) => store::adopt(&ctx, &a.domain),
        Command::Pack(a) => {
            if !a.plaintext && a.key.is_none() && a.kept.is_none() {
                return Err(CliError::Usage(
                    "pack needs --key ID (seal with that host key) or --plaintext".into(),
                ));
            }
            pack::pack(&ctx, &a)
        }
        Command::Keygen => keys::keygen(&ctx),
        Command::Rekey(a) => keys::rekey(&ctx, &a),
        Command::HostId(a) => keys::host_id(&ctx, &a),
        Command::Install(a) => install::install(&ctx, &a),
        Command::Uninstall(a) => install::uninstall(&ctx, &a),
        Command::Watch => Ok(crate::watch::watch(ctx)?),
        Command::Status(a) => status::status(&ctx, &a),
        Command::Gc(a) => gc(&ctx, &a),
        Command::Snapshot(SnapshotCommand::Revert(a)) => snapshot::revert(&ctx, &a),
        Command::Snapshot(SnapshotCommand::Create(a)) => snapshot::create(&ctx, &a),
        Command::Sync(a) => store::sync(&ctx, &a),
    }
}

use crate::logging::out;

/// `println!` through `out`: quiet on a closed pipe.
#[macro_export]
macro_rules! outln {
    () => { $crate::logging::out("\n") };
    ($($arg:tt)*) => { $crate::logging::out(&format!("{}\n", format_args!($($arg)*))) };
}

/// `gc [--dry-run] [--json]`: one line per removal (or JSON), then a total.
fn gc(ctx: &Ctx, args: &GcArgs) -> Result<(), CliError> {
    let r = crate::gc::run(&ctx.paths, &ctx.config, args.dry_run, None)?;
    if args.json {
        crate::outln!(
            "{}",
            crate::logging::json_safe(&serde_json::to_string_pretty(&r).expect("serializable"))
        );
        return Ok(());
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for x in &r.removed {
        crate::say!(
            "{verb} domain {}: {} bytes, {} days old ({})",
            x.uuid,
            x.bytes,
            x.age_days,
            x.why
        );
    }
    for u in &r.busy {
        crate::say!("skipped domain {u}: another virt-tpm-state process holds its lock");
    }
    crate::say!(
        "{} bytes used before, {} after (max_state_dir_bytes {}), {} domain(s) kept{}",
        r.used_bytes_before,
        r.used_bytes_after,
        r.max_state_dir_bytes,
        r.domains_kept,
        if r.over_cap {
            "; still over the cap: the rest belongs to domains libvirt knows"
        } else {
            ""
        }
    );
    Ok(())
}

use crate::context::{now_stamp, this_host};

/// Reads a file argument, `-` meaning stdin, bounded like the hook's stdin.
fn read_input(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let mut buf = Vec::new();
    let limit = crate::hook::MAX_STDIN;
    let res = if path == std::path::Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut buf))
    };
    res.map_err(|source| CliError::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    if buf.len() as u64 > limit {
        return Err(CliError::ReadInput {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("larger than {limit} bytes")),
        });
    }
    Ok(buf)
}
