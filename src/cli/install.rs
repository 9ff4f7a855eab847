//! `install` / `uninstall`: put the hook where libvirt runs it, never over
//! somebody else's hook, and make the running daemon see it.

use super::{CliError, Ctx, InstallArgs};
use crate::fs::{Anchor, Dir, EntryKind};
use crate::hook::HOOK_MARKER;
use crate::paths::CONFIG_FILE;
use std::path::{Path, PathBuf};

/// Largest file read back from the hooks dir or the config (a hook binary).
const MAX_READ: u64 = 256 * 1024 * 1024;

/// Where the hook goes for these arguments.
fn target(ctx: &Ctx, args: &InstallArgs) -> Result<(PathBuf, String), CliError> {
    let hooks = ctx.paths.libvirt_hooks_dir();
    if args.as_qemu {
        return Ok((hooks, "qemu".to_string()));
    }
    let ok = !args.name.is_empty()
        && !args.name.starts_with('.')
        && args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(CliError::Usage(format!(
            "--name {:?}: use letters, digits, '.', '_' and '-' only",
            args.name
        )));
    }
    Ok((hooks.join("qemu.d"), args.name.clone()))
}

/// Opens the directory the hook goes in (below `/etc/libvirt`, by the trust
/// rule), creating `hooks/` and `qemu.d/` (0755) when `create`.
fn open_hooks_dir(ctx: &Ctx, args: &InstallArgs, create: bool) -> Result<Option<Dir>, CliError> {
    let mut dir = match Anchor::LibvirtConfig.open(&ctx.paths)? {
        Some(d) => d,
        None if create => Anchor::LibvirtConfig.open_or_create(&ctx.paths, 0o755)?,
        None => return Ok(None),
    };
    let mut names = vec!["hooks"];
    if !args.as_qemu {
        names.push("qemu.d");
    }
    for name in names {
        dir = match dir.open_subdir(name)? {
            Some(d) => d,
            None if create => dir.ensure_subdir(name, 0o755)?,
            None => return Ok(None),
        };
    }
    Ok(Some(dir))
}

fn is_our_hook(bytes: &[u8]) -> bool {
    let marker = HOOK_MARKER.as_bytes();
    bytes.windows(marker.len()).any(|w| w == marker)
}

enum Existing {
    Absent,
    Ours,
    Foreign(&'static str),
}

fn existing(dir: Option<&Dir>, name: &str) -> Result<Existing, CliError> {
    let Some(dir) = dir else {
        return Ok(Existing::Absent);
    };
    Ok(match dir.entry(name)? {
        EntryKind::Missing => Existing::Absent,
        EntryKind::Symlink => Existing::Foreign("a symlink"),
        EntryKind::File | EntryKind::HardLink => match dir.read_file(name, MAX_READ) {
            Ok(Some(bytes)) if is_our_hook(&bytes) => Existing::Ours,
            Ok(_) => Existing::Foreign("another program's hook"),
            Err(_) => Existing::Foreign("a file virt-tpm-state does not read (a hard link?)"),
        },
        _ => Existing::Foreign("not a regular file"),
    })
}

/// Reads the hook binary to install: a build's or the package's file,
/// outside libvirt's and our dirs (cargo's are hard links, so not read by
/// the layer's single-link rule).
fn read_hook_binary(source: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(source).map_err(|e| CliError::ReadInput {
        path: source.to_path_buf(),
        source: e,
    })
}

/// The hook binary to install: `--hook`, or `virt-tpm-state-hook` next to
/// this program, or the packaged location.
fn hook_source(args: &InstallArgs) -> Result<PathBuf, CliError> {
    let candidates: Vec<PathBuf> = match &args.hook {
        Some(p) => vec![p.clone()],
        None => {
            let mut v = Vec::new();
            if let Ok(exe) = std::env::current_exe() {
                if let Some(dir) = exe.parent() {
                    v.push(dir.join("virt-tpm-state-hook"));
                }
            }
            v.push(PathBuf::from(
                "/usr/libexec/virt-tpm-state/virt-tpm-state-hook",
            ));
            v
        }
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            CliError::Usage(format!(
                "cannot find the hook binary (looked at {}); pass --hook PATH",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

pub(crate) fn install(ctx: &Ctx, args: &InstallArgs) -> Result<(), CliError> {
    let (dir_path, name) = target(ctx, args)?;
    let path = dir_path.join(&name);
    let dir = open_hooks_dir(ctx, args, false)?;
    if let Existing::Foreign(what) = existing(dir.as_ref(), &name)? {
        return Err(CliError::HookConflict(format!(
            "{} exists and is {what}; not replacing it. {}",
            path.display(),
            if args.as_qemu {
                "Install into qemu.d/ instead (the default, runs beside other hooks)"
            } else {
                "Choose another --name"
            }
        )));
    }
    let source = hook_source(args)?;
    let bytes = read_hook_binary(&source)?;
    if !is_our_hook(&bytes) {
        return Err(CliError::Usage(format!(
            "{} is not a virt-tpm-state-hook binary",
            source.display()
        )));
    }
    let dir = match dir {
        Some(d) => d,
        None => open_hooks_dir(ctx, args, true)?.expect("created"),
    };
    // Written aside and renamed into place complete: libvirt never runs a
    // half-copied hook.
    dir.write_file_atomically(&name, &bytes, 0o755)?;
    crate::outln!("installed {} (from {})", path.display(), source.display());
    record_helper_path(ctx)?;
    // With a key, `store` encrypts the state in the domain XML; without one
    // it refuses (plaintext is readable through read-only connections).
    super::keys::ensure_key(ctx)?;
    // An identity costs nothing until recipients are configured, and then
    // this host is ready to be named in a recipient set.
    super::keys::ensure_host_identity(ctx)?;
    reload(ctx, args);
    install_watch_unit(ctx, args)
}

pub(crate) fn uninstall(ctx: &Ctx, args: &InstallArgs) -> Result<(), CliError> {
    let (dir_path, name) = target(ctx, args)?;
    let path = dir_path.join(&name);
    let dir = open_hooks_dir(ctx, args, false)?;
    match existing(dir.as_ref(), &name)? {
        Existing::Absent => {
            crate::outln!("{} is not installed; nothing to do", path.display());
            return Ok(());
        }
        Existing::Foreign(what) => {
            return Err(CliError::HookConflict(format!(
                "{} is {what}, not virt-tpm-state's hook; leaving it alone",
                path.display()
            )))
        }
        Existing::Ours => {}
    }
    dir.expect("the hook exists").remove_file(&name)?;
    crate::outln!(
        "removed {}; backups, kept copies and domain metadata are left as they are",
        path.display()
    );
    reload(ctx, args);
    uninstall_watch_unit(ctx, args);
    Ok(())
}

/// The watch daemon's systemd unit (dist/), with `ExecStart` pointing at the
/// installed binary.
const WATCH_UNIT: &str = include_str!("../../dist/virt-tpm-state-watch.service");
const WATCH_UNIT_NAME: &str = "virt-tpm-state-watch.service";
const WATCH_UNIT_DIR: &str = "/etc/systemd/system";
const WATCH_EXEC_START: &str = "ExecStart=/usr/bin/virt-tpm-state watch";

/// systemd is the running service manager (sd_booted's test), and this is
/// the real host (not a re-rooted test tree).
fn systemd_runs(ctx: &Ctx) -> bool {
    !ctx.paths.is_rerooted() && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> bool {
    match std::process::Command::new("systemctl").args(args).status() {
        Ok(st) if st.success() => true,
        Ok(st) => {
            crate::outln!("`systemctl {}` failed ({st})", args.join(" "));
            false
        }
        Err(e) => {
            crate::outln!("cannot run `systemctl {}`: {e}", args.join(" "));
            false
        }
    }
}

/// Places the watch daemon's unit in /etc/systemd/system and enables it,
/// where systemd runs; elsewhere says how to run the daemon.
fn install_watch_unit(ctx: &Ctx, args: &InstallArgs) -> Result<(), CliError> {
    if args.no_watch {
        return Ok(());
    }
    let exe =
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/local/bin/virt-tpm-state"));
    if !systemd_runs(ctx) {
        crate::outln!(
            "systemd is not running here, so the watch daemon (it keeps running VMs' metadata in sync within seconds) was not installed as a service; run `{} watch` under your service manager (dist/{WATCH_UNIT_NAME} is the systemd unit)",
            exe.display()
        );
        return Ok(());
    }
    let path = Path::new(WATCH_UNIT_DIR).join(WATCH_UNIT_NAME);
    let dir = crate::fs::open_user_dir(Path::new(WATCH_UNIT_DIR), true)?.expect("created");
    if let Ok(Some(old)) = dir.read_file(WATCH_UNIT_NAME, MAX_READ) {
        if !String::from_utf8_lossy(&old).contains("virt-tpm-state watch") {
            crate::outln!(
                "{} exists and is not ours; left alone (the watch daemon is not enabled)",
                path.display()
            );
            return Ok(());
        }
    }
    let unit = WATCH_UNIT.replace(
        WATCH_EXEC_START,
        &format!("ExecStart={} watch", exe.display()),
    );
    dir.write_file_atomically(WATCH_UNIT_NAME, unit.as_bytes(), 0o644)?;
    crate::outln!("installed {}", path.display());
    if args.no_reload {
        crate::outln!(
            "to start the watch daemon: systemctl daemon-reload && systemctl enable --now {WATCH_UNIT_NAME}"
        );
        return Ok(());
    }
    if systemctl(&["daemon-reload"]) && systemctl(&["enable", "--now", WATCH_UNIT_NAME]) {
        crate::outln!("enabled and started {WATCH_UNIT_NAME}");
    }
    Ok(())
}

fn uninstall_watch_unit(ctx: &Ctx, args: &InstallArgs) {
    if args.no_watch || !systemd_runs(ctx) {
        return;
    }
    let path = Path::new(WATCH_UNIT_DIR).join(WATCH_UNIT_NAME);
    let Ok(Some(dir)) = crate::fs::open_user_dir(Path::new(WATCH_UNIT_DIR), false) else {
        return;
    };
    match dir.read_file(WATCH_UNIT_NAME, MAX_READ) {
        Ok(Some(text)) if String::from_utf8_lossy(&text).contains("virt-tpm-state watch") => {}
        _ => return,
    }
    if !args.no_reload {
        systemctl(&["disable", "--now", WATCH_UNIT_NAME]);
    }
    match dir.remove_file(WATCH_UNIT_NAME) {
        Ok(()) => {
            crate::outln!("removed {}", path.display());
            if !args.no_reload {
                systemctl(&["daemon-reload"]);
            }
        }
        Err(e) => crate::outln!("cannot remove {}: {e}", path.display()),
    }
}

/// The hook starts `virt-tpm-state store` after a stop; when this program is
/// not where the hook looks by default, record its path in the config.
fn record_helper_path(ctx: &Ctx) -> Result<(), CliError> {
    let Ok(exe) = std::env::current_exe() else {
        return Ok(());
    };
    let standard = ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/usr/local/sbin"]
        .iter()
        .any(|d| exe.parent() == Some(Path::new(d)));
    if standard || ctx.config.helper_path.as_deref() == Some(exe.as_path()) {
        return Ok(());
    }
    if let Some(other) = &ctx.config.helper_path {
        crate::outln!(
            "note: the config names helper {} (not this program, {}); left as it is",
            other.display(),
            exe.display()
        );
        return Ok(());
    }
    let file = ctx.paths.config_file();
    let old = crate::fs::read_file(
        &ctx.paths,
        &Anchor::Config,
        Path::new(CONFIG_FILE),
        MAX_READ,
    )?;
    let mut text = old
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "# Added by `virt-tpm-state install`: the helper the hook starts after a VM stops.\nhelper_path = {:?}\n",
        exe.display().to_string()
    ));
    Anchor::Config
        .open_or_create(&ctx.paths, 0o755)?
        .write_file_atomically(CONFIG_FILE, text.as_bytes(), 0o644)?;
    crate::outln!(
        "recorded helper_path = {} in {}",
        exe.display(),
        file.display()
    );
    Ok(())
}

/// libvirt finds hooks only at start or on SIGHUP: signal the daemons that
/// share our mount namespace (the ones that read this /etc/libvirt).
fn reload(ctx: &Ctx, args: &InstallArgs) {
    let manual = "run `systemctl reload libvirtd` (or virtqemud), or `kill -HUP` the daemon";
    if args.no_reload || ctx.paths.is_rerooted() {
        crate::outln!("libvirt was not signalled; to make it see the change, {manual}");
        return;
    }
    let daemons = find_daemons();
    if daemons.is_empty() {
        crate::outln!("libvirtd/virtqemud is not running; it will see the hook when it starts");
        return;
    }
    for (pid, comm) in daemons {
        // A pid of 0 or below would signal a whole process group.
        let sent = match pid {
            1.. => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            ),
            _ => Err(nix::errno::Errno::ESRCH),
        };
        match sent {
            Ok(()) => crate::outln!("sent SIGHUP to {comm} (pid {pid}) so it sees the change"),
            Err(e) => crate::outln!("could not signal {comm} (pid {pid}): {e}; {manual}"),
        }
    }
    // The daemon reloads asynchronously; give it a moment, then make sure it
    // answers again before a caller starts a VM.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..50 {
        if crate::libvirt::Libvirt::connect(&ctx.uri, true).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn find_daemons() -> Vec<(i32, String)> {
    let Ok(own_ns) = std::fs::read_link("/proc/self/ns/mnt") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "libvirtd" && comm != "virtqemud" {
            continue;
        }
        if std::fs::read_link(e.path().join("ns/mnt")).ok().as_ref() == Some(&own_ns) {
            out.push((pid, comm.to_string()));
        }
    }
    out
}
