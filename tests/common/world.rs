//! End-to-end harness: private libvirt "worlds" (tests/e2e/world.sh), each
//! standing in for one host, plus helpers to drive virsh, the
//! `virt-tpm-state` CLI and a guest-free TPM (tests/e2e/tpm.sh) inside them.
//!
//! Every helper that must succeed panics with everything needed to debug:
//! the command, its status, stdout, stderr and the tail of the world's
//! libvirtd.log. A `World` is brought down on drop, also when a test panics
//! (its directory under target/e2e-worlds is then kept for inspection).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The CLI under test.
pub const VTS: &str = env!("CARGO_BIN_EXE_virt-tpm-state");

/// Package root (world.sh and tpm.sh run from here).
pub fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn world_sh() -> PathBuf {
    root_dir().join("tests/e2e/world.sh")
}

pub fn tpm_sh() -> String {
    root_dir().join("tests/e2e/tpm.sh").display().to_string()
}

/// `world.sh host-check`: a fingerprint of the host's own libvirt dirs
/// (names, types, sizes, modes, owners, mtimes), to show a world left them alone.
pub fn host_fingerprint() -> String {
    let out = Command::new(world_sh())
        .arg("host-check")
        .output()
        .expect("world.sh host-check");
    assert!(out.status.success(), "{}", describe(&["host-check"], &out));
    stdout(&out)
}

/// The id of a key from its file name (`<created>-<id>.key`), as elements
/// and refusals name it.
pub fn key_id(key_file: &str) -> &str {
    key_file
        .trim_end_matches(".key")
        .rsplit('-')
        .next()
        .expect("a key file name")
}

/// A random UUID (from the kernel).
pub fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("read /proc/sys/kernel/random/uuid")
        .trim()
        .to_string()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// TPM model of a test domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tpm {
    V2,
    V12,
}

impl Tpm {
    pub fn subdir(self) -> &'static str {
        match self {
            Tpm::V2 => "tpm2",
            Tpm::V12 => "tpm1.2",
        }
    }

    pub fn permall(self) -> &'static str {
        match self {
            Tpm::V2 => "tpm2-00.permall",
            Tpm::V12 => "tpm-00.permall",
        }
    }
}

/// A domain XML: 128 MiB, no disk, an emulated TPM (`None`: no TPM at all).
pub fn domain_xml(name: &str, uuid: &str, tpm: Option<Tpm>) -> String {
    let kind = if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "qemu"
    };
    let tpm = match tpm {
        Some(Tpm::V2) => {
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>".to_string()
        }
        Some(Tpm::V12) => {
            "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>".to_string()
        }
        None => String::new(),
    };
    format!(
        "<domain type='{kind}'><name>{name}</name><uuid>{uuid}</uuid>\
<memory unit='MiB'>128</memory><vcpu>1</vcpu>\
<os><type arch='x86_64' machine='q35'>hvm</type></os>\
<devices>{tpm}</devices></domain>\n"
    )
}

/// A test VM: name, uuid, TPM model.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub uuid: String,
    pub tpm: Tpm,
}

impl Vm {
    pub fn new(name: &str, tpm: Tpm) -> Vm {
        Vm {
            name: name.to_string(),
            uuid: new_uuid(),
            tpm,
        }
    }

    pub fn xml(&self) -> String {
        domain_xml(&self.name, &self.uuid, Some(self.tpm))
    }

    /// libvirt's state dir for this VM, as seen inside a world.
    pub fn state_dir(&self) -> String {
        format!("/var/lib/libvirt/swtpm/{}/{}", self.uuid, self.tpm.subdir())
    }

    /// The copy the hook keeps at stop, as seen inside a world.
    pub fn kept_dir(&self) -> String {
        format!(
            "/var/lib/virt-tpm-state/kept/{}/{}",
            self.uuid,
            self.tpm.subdir()
        )
    }
}

pub fn describe(cmd: &[&str], out: &Output) -> String {
    format!(
        "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        cmd.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One private libvirt world (one "host").
pub struct World {
    pub dir: PathBuf,
    pub name: String,
    up: bool,
}

impl World {
    /// Brings up a world in `target/e2e-worlds/<name>-<pid>`.
    pub fn up(name: &str) -> World {
        World::up_env(name, &[])
    }

    /// A world with the hook whose stops store nothing (`store_after_stop =
    /// false`): stores happen only when the test runs one.
    pub fn without_post_stop_store(name: &str) -> World {
        let w = World::with_hook(name);
        w.append_config("store_after_stop = false");
        w
    }

    /// A world with the hook installed (`install`), as most tests want it.
    pub fn with_hook(name: &str) -> World {
        let w = World::up(name);
        w.install_hook();
        w
    }

    /// [`World::up`] with environment for world.sh (e.g. `WORLD_OVERLAY`).
    pub fn up_env(name: &str, env: &[(&str, &str)]) -> World {
        let base = root_dir().join("target/e2e-worlds");
        std::fs::create_dir_all(&base).expect("create target/e2e-worlds");
        let dir = base.join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            // A leftover of an earlier run with the same pid: make sure it is down.
            let _ = Command::new(world_sh()).arg("down").arg(&dir).output();
            let _ = std::fs::remove_dir_all(&dir);
        }
        let out = Command::new(world_sh())
            .arg("up")
            .arg(&dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run world.sh up");
        let mut w = World {
            dir,
            name: name.to_string(),
            up: false,
        };
        if !out.status.success() {
            panic!(
                "world {name} did not come up\n{}\n{}",
                describe(&["world.sh", "up", &w.dir.display().to_string()], &out),
                w.log_tail(60)
            );
        }
        w.up = true;
        w
    }

    /// Brings the world down now (also done on drop).
    pub fn down(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        let out = Command::new(world_sh())
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "world {}: down failed\n{}",
                self.name,
                describe(&["world.sh", "down"], &o)
            ),
            Err(e) => eprintln!("world {}: cannot run world.sh down: {e}", self.name),
        }
    }

    /// `world.sh reload`: SIGHUP to libvirtd, so it sees a changed hook.
    pub fn reload(&self) {
        let out = Command::new(world_sh())
            .arg("reload")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run world.sh reload");
        if !out.status.success() {
            self.fail("reload failed", &["world.sh", "reload"], &out);
        }
    }

    /// SIGTERM to the world's libvirtd (as systemd does once the last guest
    /// is off); returns when it is gone.
    pub fn stop_libvirtd(&self) {
        let pidfile = self.dir.join("libvirtd.pid");
        let pid = std::fs::read_to_string(&pidfile).expect("libvirtd.pid");
        let pid = pid.trim();
        Command::new("kill").args(["-TERM", pid]).status().unwrap();
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "libvirtd did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the world's libvirtd again; returns once it answers.
    pub fn start_libvirtd(&self) {
        let pidfile = self.dir.join("libvirtd.pid").display().to_string();
        let out = self.exec(&["libvirtd", "-d", "--pid-file", &pidfile]);
        self.check(&["libvirtd", "-d"], out);
        let t = Instant::now();
        while !self.virsh(&["list"]).status.success() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "libvirtd did not answer"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A path inside the world (one of world.sh's bind-mounted dirs), seen from the host.
    pub fn host_path(&self, abs: &str) -> PathBuf {
        self.dir.join("root").join(abs.trim_start_matches('/'))
    }

    /// A scratch file path in the world's directory, visible at the same path inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- {}/libvirtd.log (last {lines} lines) ---\n{}",
            self.dir.display(),
            all[start..].join("\n")
        )
    }

    /// Runs `args` inside the world; captured output.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_env(args, &[])
    }

    pub fn exec_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(world_sh());
        cmd.arg("exec").arg(&self.dir);
        if !env.is_empty() {
            cmd.arg("env");
            for (k, v) in env {
                cmd.arg(format!("{k}={v}"));
            }
        }
        cmd.args(args)
            .current_dir(root_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run world.sh exec {args:?}: {e}"))
    }

    /// Panics with everything printed unless `out` succeeded.
    pub fn check(&self, args: &[&str], out: Output) -> Output {
        if !out.status.success() {
            panic!(
                "world {}: command failed\n{}\n{}",
                self.name,
                describe(args, &out),
                self.log_tail(40)
            );
        }
        out
    }

    /// Panics with everything printed (and `what`) unless `cond`.
    pub fn fail(&self, what: &str, args: &[&str], out: &Output) -> ! {
        panic!(
            "world {}: {what}\n{}\n{}",
            self.name,
            describe(args, out),
            self.log_tail(40)
        )
    }

    pub fn must(&self, args: &[&str]) -> Output {
        let out = self.exec(args);
        self.check(args, out)
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        let mut v = vec!["virsh"];
        v.extend_from_slice(args);
        self.exec(&v)
    }

    pub fn must_virsh(&self, args: &[&str]) -> Output {
        let mut v = vec!["virsh"];
        v.extend_from_slice(args);
        self.must(&v)
    }

    /// The CLI under test, inside the world.
    pub fn vts(&self, args: &[&str]) -> Output {
        let mut v = vec![VTS];
        v.extend_from_slice(args);
        self.exec(&v)
    }

    pub fn must_vts(&self, args: &[&str]) -> Output {
        let mut v = vec![VTS];
        v.extend_from_slice(args);
        self.must(&v)
    }

    /// `virt-tpm-state install`, as a user would; asserts it signalled libvirtd.
    pub fn install_hook(&self) -> String {
        let out = stdout(&self.must_vts(&["install"]));
        assert!(
            out.contains("sent SIGHUP to libvirtd"),
            "install did not say it signalled libvirtd:\n{out}"
        );
        assert!(
            self.host_path("/etc/libvirt/hooks/qemu.d/virt-tpm-state")
                .is_file(),
            "no hook installed"
        );
        out
    }

    /// Names of the host keys in /etc/virt-tpm-state/keys/, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.host_path("/etc/virt-tpm-state/keys"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".key"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Copies this host's keys to `other` (name and mode kept), as a user
    /// moving VMs between hosts must.
    pub fn copy_keys_to(&self, other: &World) {
        use std::os::unix::fs::PermissionsExt;
        let keys = self.keys();
        assert!(!keys.is_empty(), "world {} has no host key", self.name);
        let dst = other.host_path("/etc/virt-tpm-state/keys");
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o700)).unwrap();
        for k in keys {
            let from = self.host_path("/etc/virt-tpm-state/keys").join(&k);
            std::fs::copy(&from, dst.join(&k)).unwrap();
            std::fs::set_permissions(dst.join(&k), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }

    /// Appends a line to the world's /etc/virt-tpm-state/config.toml.
    pub fn append_config(&self, line: &str) {
        use std::io::Write;
        let path = self.host_path("/etc/virt-tpm-state/config.toml");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(f, "{line}").expect("append config");
    }

    /// Writes `xml` to a scratch file in the world and `virsh define`s it.
    pub fn define_xml(&self, file: &str, xml: &str) -> PathBuf {
        let path = self.file(file);
        std::fs::write(&path, xml).expect("write domain XML");
        self.must_virsh(&["define", &path.display().to_string()]);
        path
    }

    pub fn define(&self, vm: &Vm) {
        self.define_xml(&format!("{}.xml", vm.name), &vm.xml());
    }

    /// `virsh dumpxml [--inactive] NAME` saved to a scratch file; returns (path, xml).
    pub fn dump(&self, name: &str, file: &str, inactive: bool) -> (PathBuf, String) {
        let mut args = vec!["dumpxml"];
        if inactive {
            args.push("--inactive");
        }
        args.push(name);
        let xml = stdout(&self.must_virsh(&args));
        let path = self.file(file);
        std::fs::write(&path, &xml).expect("write dump");
        (path, xml)
    }

    /// Pids of `virt-tpm-state store --after-stop` processes in this world.
    pub fn after_stop_helpers(&self) -> Vec<u32> {
        let ns = std::fs::read_to_string(self.dir.join("holder.ns")).unwrap_or_default();
        let ns = ns.trim();
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if !args.iter().any(|a| *a == b"--after-stop") {
                continue;
            }
            let pns = std::fs::read_link(e.path().join("ns/mnt"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if !ns.is_empty() && pns == ns {
                pids.push(pid);
            }
        }
        pids
    }

    /// Waits (up to 30 s) until no post-stop store of this world is running.
    pub fn wait_helpers(&self) {
        let start = Instant::now();
        loop {
            let pids = self.after_stop_helpers();
            if pids.is_empty() {
                return;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "world {}: post-stop store still running after 30 s: {pids:?}\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `virsh start` (optionally --paused), panicking with everything on failure.
    pub fn start(&self, name: &str, paused: bool) {
        if paused {
            self.must_virsh(&["start", "--paused", name]);
        } else {
            self.must_virsh(&["start", name]);
        }
    }

    /// `virsh destroy`, then waits for the post-stop store the hook started.
    pub fn destroy(&self, name: &str) {
        self.must_virsh(&["destroy", name]);
        self.wait_helpers();
    }

    /// First start + destroy: libvirt manufactures the TPM. Returns when the
    /// post-stop store (if any) is done.
    pub fn manufacture(&self, vm: &Vm) {
        self.define(vm);
        self.start(&vm.name, false);
        self.destroy(&vm.name);
        assert!(
            self.host_path(&vm.state_dir())
                .join(vm.tpm.permall())
                .is_file(),
            "libvirt made no {} for {}",
            vm.tpm.permall(),
            vm.name
        );
    }

    // ---- TPM helpers (tests/e2e/tpm.sh inside the world) ----

    pub fn write_secret_at(&self, dir: &str, secret: &str) {
        self.must(&[&tpm_sh(), "write-secret", dir, secret]);
    }

    pub fn read_secret_at(&self, dir: &str) -> String {
        stdout(&self.must(&[&tpm_sh(), "read-secret", dir]))
    }

    pub fn ek_pub_at(&self, dir: &str, tpm: Tpm) -> String {
        let mut args = vec![tpm_sh(), "ek-pub".to_string()];
        if tpm == Tpm::V12 {
            args.push("--tpm1".into());
        }
        args.push(dir.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ek = stdout(&self.must(&args)).trim().to_string();
        assert_eq!(ek.len(), 64, "ek-pub printed {ek:?}");
        ek
    }

    /// Plants `secret` in the (stopped) VM's TPM.
    pub fn write_secret(&self, vm: &Vm, secret: &str) {
        self.write_secret_at(&vm.state_dir(), secret);
    }

    pub fn read_secret(&self, vm: &Vm) -> String {
        self.read_secret_at(&vm.state_dir())
    }

    pub fn ek_pub(&self, vm: &Vm) -> String {
        self.ek_pub_at(&vm.state_dir(), vm.tpm)
    }

    /// Bytes of the VM's live permall (None when absent).
    pub fn permall(&self, vm: &Vm) -> Option<Vec<u8>> {
        std::fs::read(self.host_path(&vm.state_dir()).join(vm.tpm.permall())).ok()
    }

    pub fn must_permall(&self, vm: &Vm) -> Vec<u8> {
        self.permall(vm)
            .unwrap_or_else(|| panic!("no permall for {} in world {}", vm.name, self.name))
    }

    /// `store NAME`, which must say it stored a generation.
    pub fn must_store(&self, name: &str) {
        let out = stdout(&self.must_vts(&["store", name]));
        assert!(out.contains("stored generation"), "store said: {out}");
    }

    /// Defines `vm`, lets libvirt manufacture its TPM, plants `secret`, and
    /// stores the state into the metadata with `store`. Returns the EK fingerprint.
    pub fn stored_with_secret(&self, vm: &Vm, secret: &str) -> String {
        self.manufacture(vm);
        self.write_secret(vm, secret);
        let ek = self.ek_pub(vm);
        self.must_store(&vm.name);
        ek
    }

    /// [`World::stored_with_secret`] for a new TPM 2.0 VM `name`: the VM and
    /// its EK fingerprint.
    pub fn stored_vm(&self, name: &str, secret: &str) -> (Vm, String) {
        let vm = Vm::new(name, Tpm::V2);
        let ek = self.stored_with_secret(&vm, secret);
        (vm, ek)
    }

    /// Starts `vm` paused (the hook restores its TPM state at prepare) and
    /// stops it again: the secret its TPM then holds.
    pub fn secret_after_start(&self, vm: &Vm) -> String {
        self.start(&vm.name, true);
        self.destroy(&vm.name);
        self.read_secret(vm)
    }

    /// Starts `vm` paused and checks the hook restored exactly the `stored`
    /// permall; stopped, its TPM holds `secret` and, where given, EK `ek`.
    pub fn assert_restores(
        &self,
        vm: &Vm,
        stored: &[u8],
        secret: &str,
        ek: Option<&str>,
        what: &str,
    ) {
        self.start(&vm.name, true);
        assert!(
            self.must_permall(vm) == stored,
            "{what}: the restored permall differs from the stored one"
        );
        self.destroy(&vm.name);
        assert_eq!(self.read_secret(vm), secret, "{what}: secret");
        if let Some(ek) = ek {
            assert_eq!(self.ek_pub(vm), ek, "{what}: EK");
        }
    }

    /// `virsh undefine`, which must take libvirt's TPM state of `vm` with it:
    /// what comes back came from the metadata.
    pub fn undefine(&self, vm: &Vm) {
        self.must_virsh(&["undefine", &vm.name]);
        assert!(
            !self.swtpm_uuid_dir_exists(&vm.uuid),
            "undefine left /var/lib/libvirt/swtpm/{}",
            vm.uuid
        );
    }

    /// `virsh dumpxml` of `vm` to `file`, [`World::undefine`], and define it
    /// again from the dump: its TPM state can come back only from the metadata.
    pub fn redefine(&self, vm: &Vm, file: &str, inactive: bool) {
        let (_, xml) = self.dump(&vm.name, file, inactive);
        self.undefine(vm);
        self.define_xml(file, &xml);
    }

    /// Whether libvirt's /var/lib/libvirt/swtpm/<uuid> exists.
    pub fn swtpm_uuid_dir_exists(&self, uuid: &str) -> bool {
        self.host_path(&format!("/var/lib/libvirt/swtpm/{uuid}"))
            .exists()
    }

    /// `show --json [--inactive] NAME`, parsed.
    pub fn show_json(&self, name: &str, inactive: bool) -> serde_json::Value {
        let mut args = vec!["show", "--json"];
        if inactive {
            args.push("--inactive");
        }
        args.push(name);
        let out = self.must_vts(&args);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| self.fail(&format!("show --json is not JSON: {e}"), &args, &out))
    }

    /// The world's libvirt version (`virsh version`'s library line), e.g. (11, 3, 0).
    pub fn libvirt_version(&self) -> (u32, u32, u32) {
        let out = stdout(&self.must_virsh(&["version"]));
        let v = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Using library: libvirt "))
            .unwrap_or_else(|| panic!("no library version in virsh version:\n{out}"));
        let n: Vec<u32> = v
            .trim()
            .split('.')
            .map(|x| x.parse().expect("numeric libvirt version"))
            .collect();
        assert_eq!(n.len(), 3, "libvirt version {v:?}");
        (n[0], n[1], n[2])
    }

    /// The world's QEMU version (`virsh version`'s hypervisor line).
    pub fn qemu_version(&self) -> String {
        let out = stdout(&self.must_virsh(&["version"]));
        out.lines()
            .find_map(|l| l.trim().strip_prefix("Running hypervisor: QEMU "))
            .unwrap_or_else(|| panic!("no hypervisor version in virsh version:\n{out}"))
            .trim()
            .to_string()
    }

    /// Relative paths of every entry under a host path, sorted (dirs end in '/').
    pub fn tree(&self, abs: &str) -> Vec<String> {
        let base = self.host_path(abs);
        let mut out = Vec::new();
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(format!("{rel}/"));
                    walk(base, &p, out);
                } else {
                    out.push(rel);
                }
            }
        }
        walk(&base, &base, &mut out);
        out.sort();
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.down();
        if panicking {
            eprintln!(
                "world {} kept for inspection: {}",
                self.name,
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Flips one base64 character in the middle of our element's file text
/// (whatever its `encoding`).
pub fn corrupt_base64(xml: &str) -> String {
    let file = xml
        .find("<vts:file ")
        .expect("no vts:file element in the XML");
    let start = file + xml[file..].find('>').expect("unterminated vts:file tag") + 1;
    let end = start + xml[start..].find('<').expect("unterminated file element");
    let text = &xml[start..end];
    // The middle non-whitespace character.
    let idx = text
        .char_indices()
        .filter(|(_, c)| !c.is_whitespace())
        .nth(text.trim().len() / 2)
        .map(|(i, _)| i)
        .expect("empty base64 text");
    let c = text.as_bytes()[idx] as char;
    let flipped = if c == 'A' { 'B' } else { 'A' };
    let mut s = String::with_capacity(xml.len());
    s.push_str(&xml[..start + idx]);
    s.push(flipped);
    s.push_str(&xml[start + idx + 1..]);
    s
}

/// Replaces the value of the first `sha256="..."` attribute with zeros.
pub fn corrupt_sha256(xml: &str) -> String {
    let key = "sha256=\"";
    let i = xml.find(key).expect("no sha256 attribute") + key.len();
    let mut s = xml.to_string();
    s.replace_range(i..i + 64, &"0".repeat(64));
    assert_ne!(s, xml);
    s
}

// ---- UEFI (tests/worlds/nvram.rs, tests/snapshots.rs) ----

/// A UEFI domain with a TPM 2.0: OVMF by firmware autoselection, without
/// Secure Boot (which would need SMM, missing under nested KVM here). A
/// flash build with a VARS file: libvirt 12.8 with Debian unstable's
/// descriptors would otherwise pick the stateless AMD SEV ROM
/// (`OVMF.amdsev.fd`, no VARS at all), so where libvirt accepts it (11.x
/// and later; 9.0 refuses loader attributes beside autoselection) the
/// loader type is asked for.
pub fn uefi_xml(w: &World, vm: &Vm) -> String {
    let xml = domain_xml(&vm.name, &vm.uuid, Some(vm.tpm));
    let loader = if w.libvirt_version() >= (11, 0, 0) {
        "<loader type='pflash'/>"
    } else {
        ""
    };
    let os = format!(
        "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>\
<firmware><feature enabled='no' name='secure-boot'/></firmware>{loader}</os><features><acpi/></features>"
    );
    let out = xml.replacen(
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>",
        &os,
        1,
    );
    assert_ne!(out, xml, "domain_xml changed its <os>");
    out
}

pub fn vars_path(vm: &Vm) -> String {
    format!("/var/lib/libvirt/qemu/nvram/{}_VARS.fd", vm.name)
}

pub fn fw_vars(args: &[&str]) -> String {
    let out = super::runner::must_run(
        Command::new("virt-fw-vars").args(args),
        &format!("virt-fw-vars {args:?}"),
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---- the watch daemon (tests/cli/watch.rs, tests/snapshots.rs) ----

/// The daemon, run in the foreground with `-v` inside a world; its log
/// (stderr) goes to a file. Killed on drop.
pub struct Watch {
    child: Child,
    log: PathBuf,
}

impl Watch {
    pub fn start(w: &World, tag: &str) -> Watch {
        let log = w.file(&format!("watch-{tag}.log"));
        let f = std::fs::File::create(&log).expect("create watch log");
        // world.sh exec execs nsenter, which execs env, which execs the CLI:
        // the child's pid is the daemon's.
        let child = Command::new(world_sh())
            .arg("exec")
            .arg(&w.dir)
            .args([VTS, "-v", "watch"])
            .current_dir(root_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn watch");
        let d = Watch { child, log };
        d.wait_log("watching qemu:///system", Duration::from_secs(10));
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let t = Instant::now();
        while !self.log().contains(needle) {
            if t.elapsed() > limit {
                panic!(
                    "the daemon did not log {needle:?} within {limit:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// user+system CPU time of the daemon, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn hup(&self) {
        let st = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -HUP failed");
    }

    /// SIGTERM; returns the exit status.
    pub fn term(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- daemon log {} ---\n{}", self.log.display(), self.log());
        }
    }
}
