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
use virt_tpm_state::format::{encode, Provenance, Style};
use virt_tpm_state::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::synthetic_blob;

pub const HOOK: &str = env!("CARGO_BIN_EXE_virt-tpm-state-hook");
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
    );
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
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
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
        let mut cmd = Command::new(HOOK);
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
        let mut cmd = self.hook_command(op, subop);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
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
