//! `install` / `uninstall`: put the hook where libvirt runs it, never over
//! somebody else's hook, and make the running daemon see it.

use super::{CliError, Ctx, InstallArgs};
use crate::hook::HOOK_MARKER;
use crate::statefs::{create_private_dir_all, write_file_atomically_mode};
use std::path::{Path, PathBuf};

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

fn is_our_hook(bytes: &[u8]) -> bool {
    let marker = HOOK_MARKER.as_bytes();
    bytes.windows(marker.len()).any(|w| w == marker)
}

enum Existing {
    Absent,
    Ours,
    Foreign(&'static str),
}

fn existing(path: &Path) -> Result<Existing, CliError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Existing::Absent),
        Err(e) => Err(CliError::ReadInput {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(m) if m.file_type().is_symlink() => Ok(Existing::Foreign("a symlink")),
        Ok(m) if !m.is_file() => Ok(Existing::Foreign("not a regular file")),
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(|source| CliError::ReadInput {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(if is_our_hook(&bytes) {
                Existing::Ours
            } else {
                Existing::Foreign("another program's hook")
            })
        }
    }
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

pub fn install(ctx: &Ctx, args: &InstallArgs) -> Result<(), CliError> {
    let (dir, name) = target(ctx, args)?;
    let path = dir.join(&name);
    if let Existing::Foreign(what) = existing(&path)? {
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
    let bytes = std::fs::read(&source).map_err(|e| CliError::ReadInput {
        path: source.clone(),
        source: e,
    })?;
    if !is_our_hook(&bytes) {
        return Err(CliError::Usage(format!(
            "{} is not a virt-tpm-state-hook binary",
            source.display()
        )));
    }
    create_dir_0755(&dir)?;
    // Written aside without its exec bit and renamed into place complete:
    // libvirt never runs a half-copied hook.
    write_file_atomically_mode(&dir, &name, &bytes, 0o755)?;
    println!("installed {} (from {})", path.display(), source.display());
    record_helper_path(ctx)?;
    // With a key, `store` encrypts the state in the domain XML; without one
    // it refuses (plaintext is readable through read-only connections).
    super::keys::ensure_key(ctx)?;
    reload(ctx, args);
    install_watch_unit(ctx, args)
}

pub fn uninstall(ctx: &Ctx, args: &InstallArgs) -> Result<(), CliError> {
    let (dir, name) = target(ctx, args)?;
    let path = dir.join(&name);
    match existing(&path)? {
        Existing::Absent => {
            println!("{} is not installed; nothing to do", path.display());
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
    std::fs::remove_file(&path).map_err(|e| CliError::ReadInput {
        path: path.clone(),
        source: e,
    })?;
    println!(
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
            println!("`systemctl {}` failed ({st})", args.join(" "));
            false
        }
        Err(e) => {
            println!("cannot run `systemctl {}`: {e}", args.join(" "));
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
        println!(
            "systemd is not running here, so the watch daemon (it keeps running VMs' metadata in sync within seconds) was not installed as a service; run `{} watch` under your service manager (dist/{WATCH_UNIT_NAME} is the systemd unit)",
            exe.display()
        );
        return Ok(());
    }
    let dir = Path::new(WATCH_UNIT_DIR);
    let path = dir.join(WATCH_UNIT_NAME);
    if let Ok(old) = std::fs::read_to_string(&path) {
        if !old.contains("virt-tpm-state watch") {
            println!(
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
    create_dir_0755(dir)?;
    write_file_atomically_mode(dir, WATCH_UNIT_NAME, unit.as_bytes(), 0o644)?;
    println!("installed {}", path.display());
    if args.no_reload {
        println!(
            "to start the watch daemon: systemctl daemon-reload && systemctl enable --now {WATCH_UNIT_NAME}"
        );
        return Ok(());
    }
    if systemctl(&["daemon-reload"]) && systemctl(&["enable", "--now", WATCH_UNIT_NAME]) {
        println!("enabled and started {WATCH_UNIT_NAME}");
    }
    Ok(())
}

fn uninstall_watch_unit(ctx: &Ctx, args: &InstallArgs) {
    if args.no_watch || !systemd_runs(ctx) {
        return;
    }
    let path = Path::new(WATCH_UNIT_DIR).join(WATCH_UNIT_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.contains("virt-tpm-state watch") => {}
        _ => return,
    }
    if !args.no_reload {
        systemctl(&["disable", "--now", WATCH_UNIT_NAME]);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            println!("removed {}", path.display());
            if !args.no_reload {
                systemctl(&["daemon-reload"]);
            }
        }
        Err(e) => println!("cannot remove {}: {e}", path.display()),
    }
}

fn create_dir_0755(dir: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| {
            CliError::Fs(crate::statefs::FsError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source: e,
            })
        })
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
        println!(
            "note: the config names helper {} (not this program, {}); left as it is",
            other.display(),
            exe.display()
        );
        return Ok(());
    }
    let file = ctx.paths.config_file();
    let mut text = std::fs::read_to_string(&file).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "# Added by `virt-tpm-state install`: the helper the hook starts after a VM stops.\nhelper_path = {:?}\n",
        exe.display().to_string()
    ));
    create_private_dir_all(&ctx.paths.config_dir())?;
    write_file_atomically_mode(
        &ctx.paths.config_dir(),
        "config.toml",
        text.as_bytes(),
        0o644,
    )?;
    println!(
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
        println!("libvirt was not signalled; to make it see the change, {manual}");
        return;
    }
    let daemons = find_daemons();
    if daemons.is_empty() {
        println!("libvirtd/virtqemud is not running; it will see the hook when it starts");
        return;
    }
    for (pid, comm) in daemons {
        let sent = rustix::process::Pid::from_raw(pid)
            .ok_or(rustix::io::Errno::SRCH)
            .and_then(|p| rustix::process::kill_process(p, rustix::process::Signal::HUP));
        match sent {
            Ok(()) => println!("sent SIGHUP to {comm} (pid {pid}) so it sees the change"),
            Err(e) => println!("could not signal {comm} (pid {pid}): {e}; {manual}"),
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
