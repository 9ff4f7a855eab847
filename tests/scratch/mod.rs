//! A scratch host for the hook binary (`VIRT_TPM_STATE_ROOT`), shared by
//! tests/faults.rs and tests/concurrency.rs: machine states (TPM 2.0 permall
//! plus VARS file), the prepare-begin XML carrying one, and readers that
//! refuse an empty or partial state dir.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use virt_tpm_state::format::{encode, Protection, Provenance, Style};
use virt_tpm_state::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::synthetic_blob;

/// The hook crate's binary (hooks/), which cargo puts next to the CLI, where
/// `install` looks for it too: built by `cargo build -p virt-tpm-state-hook`
/// (scripts/test.sh), not by cargo for this package's tests.
pub const HOOK: &str = concat!(env!("CARGO_BIN_EXE_virt-tpm-state"), "-hook");
pub const NAME: &str = "tpm2-with-metadata";
pub const VARS_REL: &str = "var/lib/libvirt/qemu/nvram/faults_VARS.fd";

// ================================================================ states

pub fn stream(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(&Sha256Sum::of(format!("{seed}/{i}").as_bytes()).0);
        i += 1;
    }
    out.truncate(len);
    out
}

/// One machine state: a TPM 2.0 permall and a VARS file, distinct per seed.
#[derive(Clone, Debug, PartialEq)]
pub struct St {
    pub permall: Vec<u8>,
    pub vars: Vec<u8>,
}

impl St {
    pub fn new(seed: &str) -> St {
        St {
            permall: synthetic_blob(0, &stream(&format!("{seed}/tpm"), 6224)),
            vars: stream(&format!("{seed}/vars"), 128 * 1024),
        }
    }

    pub fn machine(&self) -> MachineState {
        MachineState::new(
            Some(TpmState::new(
                TpmVersion::V2_0,
                vec![StateFile {
                    name: "tpm2-00.permall".into(),
                    data: self.permall.clone(),
                }],
            )),
            (!self.vars.is_empty()).then(|| self.vars.clone()),
        )
    }

    pub fn digest(&self) -> String {
        self.machine().digest().to_string()
    }
}

pub fn fixture_xml() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/domains/hook-stdin-prepare-begin.xml");
    std::fs::read_to_string(p).unwrap()
}

pub fn fixture_uuid(xml: &str) -> String {
    let s = xml.find("<uuid>").unwrap() + "<uuid>".len();
    let e = xml.find("</uuid>").unwrap();
    xml[s..e].trim().to_string()
}

/// The prepare-begin XML of a UEFI domain with a TPM 2.0 whose metadata
/// holds `st` (generation `gen`).
pub fn xml_with(st: &St, gen: u64) -> String {
    xml_for(st, gen, &fixture_uuid(&fixture_xml()), true)
}

/// The prepare-begin XML of domain `uuid` whose metadata holds `st`; with
/// `nvram`, a UEFI domain (VARS file at [`VARS_REL`]) and the VARS file in
/// the element too.
pub fn xml_for(st: &St, gen: u64, uuid: &str, nvram: bool) -> String {
    let fixture = fixture_xml();
    let base = fixture.replacen(&fixture_uuid(&fixture), uuid, 1);
    if !nvram {
        let st = St {
            permall: st.permall.clone(),
            vars: Vec::new(),
        };
        return with_element(&base, &st, gen, uuid);
    }
    let base = base.replacen(
        "    <boot dev='hd'/>\n",
        &format!("    <boot dev='hd'/>\n    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\n    <nvram>/{VARS_REL}</nvram>\n"),
        1,
    );
    assert!(base.contains("<nvram>"), "fixture <os> changed");
    with_element(&base, st, gen, uuid)
}

fn with_element(base: &str, st: &St, gen: u64, uuid: &str) -> String {
    let element = encode(
        &st.machine(),
        &Provenance {
            uuid: DomainUuid::parse(uuid).unwrap(),
            generation: gen,
            parent: None,
            stored: "2026-01-01T00:00:00Z".into(),
            host: "test-host".into(),
        },
        Style::Standalone,
        Protection::Plain,
    )
    .unwrap();
    let indented: String = element.lines().map(|l| format!("    {l}\n")).collect();
    let pos = base
        .find("urn:virt-tpm-state:1")
        .expect("placeholder element");
    let line_start = base[..pos].rfind('\n').unwrap() + 1;
    let line_end = base[pos..].find('\n').unwrap() + pos + 1;
    format!("{}{indented}{}", &base[..line_start], &base[line_end..])
}

// ================================================================ scratch host

/// Markers of our temp and old entries: none may survive a finished run.
pub const LEFTOVER_MARKS: &[&str] = &[".vts-new.", ".vts-old.", ".vts-nvram-new."];

pub struct Scratch {
    pub tmp: std::rc::Rc<tempfile::TempDir>,
    pub root: PathBuf,
    pub uuid: String,
}

impl Scratch {
    pub fn new() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let s = Scratch {
            root: tmp.path().join("root"),
            tmp: std::rc::Rc::new(tmp),
            uuid: fixture_uuid(&fixture_xml()),
        };
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        s.write(
            "etc/libvirt/qemu.conf",
            &format!("swtpm_user = \"+{uid}\"\nswtpm_group = \"+{gid}\"\nuser = \"+{uid}\"\ngroup = \"+{gid}\"\n"),
        );
        s.write(
            "etc/virt-tpm-state/config.toml",
            "store_after_stop = false\nlock_timeout_secs = 5\n",
        );
        // libvirt makes its nvram dir; an explicit <nvram>'s dir is never created.
        std::fs::create_dir_all(s.path(VARS_REL).parent().unwrap()).unwrap();
        s
    }

    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// The same host as copied to `root` (by a mount-namespace script).
    pub fn view(&self, root: PathBuf) -> Scratch {
        Scratch {
            tmp: self.tmp.clone(),
            root,
            uuid: self.uuid.clone(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn live_dir(&self) -> PathBuf {
        self.path(&format!("var/lib/libvirt/swtpm/{}/tpm2", self.uuid))
    }

    /// The same host seen for another domain.
    pub fn for_uuid(&self, uuid: &str) -> Scratch {
        Scratch {
            tmp: self.tmp.clone(),
            root: self.root.clone(),
            uuid: uuid.to_string(),
        }
    }

    /// The TPM state of a domain without a VARS file.
    pub fn live_tpm(&self) -> Option<St> {
        read_state(&self.live_dir(), None, "live state dir")
    }

    pub fn kept_dir(&self) -> PathBuf {
        self.path(&format!("var/lib/virt-tpm-state/kept/{}/tpm2", self.uuid))
    }

    pub fn journal(&self) -> PathBuf {
        self.path(&format!("var/lib/virt-tpm-state/synced/{}", self.uuid))
    }

    /// Starts the hook with `xml` written to its stdin (closed after).
    /// The hook as libvirt runs it (clean environment), re-rooted here.
    fn hook_command(&self, op: &str, subop: &str) -> Command {
        self.hook_command_umask(op, subop, None)
    }

    /// [`Scratch::hook_command`], started by `sh` under `umask` when given
    /// (the hook inherits whatever umask libvirtd or an admin's wrapper has).
    fn hook_command_umask(&self, op: &str, subop: &str, umask: Option<&str>) -> Command {
        let mut cmd = match umask {
            None => Command::new(HOOK),
            Some(m) => {
                assert!(m.bytes().all(|b| b.is_ascii_digit()), "umask {m:?}");
                let mut c = Command::new("/bin/sh");
                c.args(["-c", &format!("umask {m} && exec \"$0\" \"$@\""), HOOK]);
                c
            }
        };
        cmd.args([NAME, op, subop, "-"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .env("VIRT_TPM_STATE_ROOT", self.root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn spawn_hook(&self, op: &str, subop: &str, xml: &str) -> std::process::Child {
        let mut child = self.hook_command(op, subop).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = xml.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        child
    }

    pub fn hook(&self, op: &str, subop: &str, xml: &str, env: &[(&str, String)]) -> Output {
        self.hook_umask(op, subop, xml, env, None)
    }

    /// [`Scratch::hook`] started under `umask` (e.g. "000").
    pub fn hook_umask(
        &self,
        op: &str,
        subop: &str,
        xml: &str,
        env: &[(&str, String)],
        umask: Option<&str>,
    ) -> Output {
        let mut cmd = self.hook_command_umask(op, subop, umask);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the hook {HOOK}: {e}"));
        let written = child.stdin.take().unwrap().write_all(xml.as_bytes());
        let out = child.wait_with_output().unwrap();
        // A hook that exits before it read all of its stdin breaks the
        // pipe: its exit status and stderr say why.
        if let Err(e) = written {
            assert!(
                e.kind() == std::io::ErrorKind::BrokenPipe && !out.status.success(),
                "writing the hook's stdin: {e}\n{}",
                show(&out)
            );
        }
        out
    }

    pub fn prepare(&self, xml: &str, env: &[(&str, String)]) -> Output {
        self.hook("prepare", "begin", xml, env)
    }

    /// What the state dir holds: `None` when absent; panics on an empty or
    /// partial dir (no permall), which would make libvirt 9.0 start an
    /// unmanufactured TPM.
    pub fn live(&self) -> Option<St> {
        read_state(
            &self.live_dir(),
            Some(&self.path(VARS_REL)),
            "live state dir",
        )
    }

    pub fn kept(&self) -> Option<St> {
        read_state(&self.kept_dir(), None, "kept copy")
    }

    pub fn j(&self) -> Option<String> {
        std::fs::read_to_string(self.journal())
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Backups (permall + VARS) of the domain.
    pub fn backups(&self) -> Vec<St> {
        let dir = self.path(&format!("var/lib/virt-tpm-state/backups/{}", self.uuid));
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with('.') {
                out.extend(read_state(&e.path(), None, "backup"));
            }
        }
        out
    }

    /// Every path below the root holding one of our temp markers.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        find_leftovers(&self.root(), &self.root(), &mut out);
        out
    }

    /// The whole tree (path -> content digest or "dir"), without the lock
    /// files, to compare before and after a failed run.
    pub fn tree(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        tree(&self.root(), &self.root(), &mut out);
        out
    }
}

pub fn read_state(dir: &Path, vars: Option<&Path>, what: &str) -> Option<St> {
    if !dir.exists() {
        return None;
    }
    let permall = std::fs::read(dir.join("tpm2-00.permall")).unwrap_or_else(|e| {
        panic!(
            "{what} {} exists without its permall ({e}): libvirt would start a blank TPM",
            dir.display()
        )
    });
    let vars = match vars {
        Some(p) => std::fs::read(p).unwrap_or_default(),
        None => std::fs::read(dir.join("VARS.fd")).unwrap_or_default(),
    };
    Some(St { permall, vars })
}

pub fn find_leftovers(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        if LEFTOVER_MARKS.iter().any(|m| name.contains(m)) {
            out.push(rel);
        }
        if e.file_type().unwrap().is_dir() {
            find_leftovers(root, &e.path(), out);
        }
    }
}

pub fn tree(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let rel = e.path().strip_prefix(root).unwrap().display().to_string();
        // The lock dir and files are no state (made on the first lock).
        if rel == "run" || rel.starts_with("run/") {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            out.insert(rel, "dir".into());
            tree(root, &e.path(), out);
        } else {
            let data = std::fs::read(e.path()).unwrap_or_default();
            out.insert(rel, Sha256Sum::of(&data).short());
        }
    }
}

pub fn show(out: &Output) -> String {
    format!(
        "exit {:?} (signal {:?})\nstdout: {:?}\nstderr: {}",
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{what}: expected a clean success\n{}",
        show(out)
    );
}

/// Failed with `code` and one clear line on stderr, nothing on stdout.
pub fn failed(out: &Output, code: i32, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{what}\n{}", show(out));
    assert!(out.stdout.is_empty(), "{what}: stdout\n{}", show(out));
    assert_eq!(err.lines().count(), 1, "{what}: one line\n{}", show(out));
    assert!(err.starts_with("virt-tpm-state: "), "{what}\n{}", show(out));
    err
}

/// Failed with one of `codes` and one clear line on stderr (see [`failed`]);
/// returns the code and the line.
pub fn failed_any(out: &Output, codes: &[i32], what: &str) -> (i32, String) {
    let code = out.status.code().unwrap_or(-1);
    assert!(
        codes.contains(&code),
        "{what}: expected exit {codes:?}\n{}",
        show(out)
    );
    (code, failed(out, code, what))
}

// ================================================================ less trusted users (issue 16)

/// The less trusted users of a Debian host, as ids: the QEMU user (owns
/// `/var/lib/libvirt/qemu`) and the swtpm user (owns each `tpm2/`).
#[derive(Clone, Copy, Debug)]
pub struct Users {
    pub qemu_uid: u32,
    pub qemu_gid: u32,
    pub tss_uid: u32,
    pub tss_gid: u32,
}

/// `libvirt-qemu` and `tss`, each with a group of its name, created with
/// `useradd --system` / `groupadd --system` where missing (root only; once
/// per test process). The gids are those of the groups named like the users
/// (Debian's `libvirt-qemu` has primary group `kvm`, and a `libvirt-qemu`
/// group that qemu.conf's `group` names).
pub fn users() -> Users {
    static USERS: std::sync::OnceLock<Users> = std::sync::OnceLock::new();
    *USERS.get_or_init(|| {
        let (qemu_uid, qemu_gid) = ensure_user("libvirt-qemu");
        let (tss_uid, tss_gid) = ensure_user("tss");
        Users {
            qemu_uid,
            qemu_gid,
            tss_uid,
            tss_gid,
        }
    })
}

fn ensure_user(name: &str) -> (u32, u32) {
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        assert!(out.status.success(), "{args:?}\n{}", show(&out));
    };
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        run(&[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]);
    }
    if nix::unistd::Group::from_name(name).ok().flatten().is_none() {
        run(&["groupadd", "--system", name]);
    }
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("user {name} missing after useradd"));
    let g = nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("group {name} missing after groupadd"));
    (u.uid.as_raw(), g.gid.as_raw())
}

/// `cmd...` as `uid:gid` without supplementary groups or capabilities
/// (`setpriv`), with a clean environment.
pub fn as_user(uid: u32, gid: u32, cmd: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--inh-caps=-all")
        .arg("--")
        .args(cmd)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    c
}

/// Runs [`as_user`]; panics with everything unless it succeeded.
pub fn must_as_user(uid: u32, gid: u32, cmd: &[&str]) -> Output {
    let out = as_user(uid, gid, cmd).output().expect("run setpriv");
    assert!(
        out.status.success(),
        "as {uid}:{gid}: {cmd:?}\n{}",
        show(&out)
    );
    out
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// Owner and mode: uid, gid, mode & 0o7777 (shown as `uid:gid 0mode`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Om(pub u32, pub u32, pub u32);

impl std::fmt::Debug for Om {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} {:04o}", self.0, self.1, self.2)
    }
}

/// Owner and mode of `p`, not following a link.
pub fn stat_of(p: &Path) -> Om {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    Om(m.uid(), m.gid(), m.mode() & 0o7777)
}

/// One entry, never following a link: kind, owner, mode, and for a file
/// the digest of its content, for a link its target ("absent" if none).
pub fn meta_of(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return "absent".into();
    };
    let ft = m.file_type();
    let head = format!("{}:{} {:04o}", m.uid(), m.gid(), m.mode() & 0o7777);
    if ft.is_symlink() {
        let t = std::fs::read_link(p).unwrap_or_default();
        format!("link {head} -> {}", t.display())
    } else if ft.is_dir() {
        format!("dir {head}")
    } else if ft.is_file() {
        let data = std::fs::read(p).unwrap_or_default();
        format!("file {head} {}", Sha256Sum::of(&data).short())
    } else {
        format!("other {head}")
    }
}

/// [`meta_of`] for `dir` (as ".") and everything below it, never following
/// a link; the subtrees at the relative paths in `skip` are listed but not
/// entered.
pub fn meta_tree(dir: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = meta_of(&p);
            let is_dir = meta.starts_with("dir ");
            out.insert(rel.clone(), meta);
            if is_dir && !skip.contains(&rel.as_str()) {
                walk(base, &p, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(".".into(), meta_of(dir));
    walk(dir, dir, skip, &mut out);
    out
}

/// (relative path, uid, gid) of every entry below `dir`, never following a
/// link nor entering the subtrees at `skip` (cheap: no content read).
pub fn owners(dir: &Path, skip: &[&str]) -> Vec<(String, u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if m.file_type().is_dir() && !skip.contains(&rel.as_str()) {
                todo.push(p);
            }
            out.push((rel, m.uid(), m.gid()));
        }
    }
    out
}

/// The entries whose [`meta_of`] differs between two [`meta_tree`]s.
pub fn meta_diff(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => d.push(format!("- {k}  ({v})")),
            Some(w) if w != v => d.push(format!("~ {k}  {v}  =>  {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            d.push(format!("+ {k}  ({v})"));
        }
    }
    d
}

pub fn show_meta(t: &BTreeMap<String, String>) -> String {
    t.iter().map(|(k, v)| format!("  {k}  {v}\n")).collect()
}

/// libvirt's default VARS file of [`NAME`] (firmware autoselection).
pub const AUTO_VARS_REL: &str = "var/lib/libvirt/qemu/nvram/tpm2-with-metadata_VARS.fd";

/// The prepare-begin XML of a UEFI domain by firmware autoselection (no
/// `<nvram>` path: libvirt passes none to `prepare`), its metadata holding
/// `st` (generation `gen`), VARS included: restored to [`AUTO_VARS_REL`].
pub fn xml_auto(st: &St, gen: u64) -> String {
    let fixture = fixture_xml();
    let base = fixture.replacen("<os>", "<os firmware='efi'>", 1);
    assert_ne!(base, fixture, "fixture <os> changed");
    with_element(&base, st, gen, &fixture_uuid(&fixture))
}

/// The CLI under test (`virt-tpm-state`).
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_virt-tpm-state");

impl Scratch {
    /// A scratch host laid out and owned as Debian's libvirt packages do,
    /// with the real less trusted users: `var/lib/libvirt` root 0755,
    /// `var/lib/libvirt/qemu` libvirt-qemu 0750, its `nvram` libvirt-qemu
    /// 0755 (the QEMU user can rename it and put a link in its place);
    /// qemu.conf names `libvirt-qemu` as `user`/`group` and leaves
    /// `swtpm_user` at its default (`tss`). Everything down to the root is
    /// traversable by those users (the temp dir is 0755). No swtpm base yet.
    pub fn debian(u: &Users) -> Scratch {
        let s = Scratch::new();
        s.write(
            "etc/libvirt/qemu.conf",
            "user = \"libvirt-qemu\"\ngroup = \"libvirt-qemu\"\n",
        );
        chmod(s.tmp.path(), 0o755);
        for rel in [
            "",
            "var",
            "var/lib",
            "var/lib/libvirt",
            "etc",
            "etc/libvirt",
            "etc/libvirt/qemu.conf",
            "etc/virt-tpm-state",
            "etc/virt-tpm-state/config.toml",
        ] {
            let p = s.path(rel);
            chown(&p, 0, 0);
            chmod(&p, if p.is_dir() { 0o755 } else { 0o644 });
        }
        let qemu = s.path("var/lib/libvirt/qemu");
        chown(&qemu, u.qemu_uid, u.qemu_gid);
        chmod(&qemu, 0o750);
        let nvram = qemu.join("nvram");
        chown(&nvram, u.qemu_uid, u.qemu_gid);
        chmod(&nvram, 0o755);
        s
    }

    /// The CLI, re-rooted here, with a clean environment; as `user`
    /// (uid, gid) through `setpriv` when given.
    pub fn cli(&self, args: &[&str], user: Option<(u32, u32)>) -> Output {
        let mut cmd = match user {
            Some((uid, gid)) => as_user(uid, gid, &[CLI_BIN]),
            None => {
                let mut c = Command::new(CLI_BIN);
                c.env_clear()
                    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                    .env("LC_ALL", "C")
                    .stdin(Stdio::null());
                c
            }
        };
        cmd.args(args)
            .env("VIRT_TPM_STATE_ROOT", self.root())
            .output()
            .expect("run virt-tpm-state")
    }
}
