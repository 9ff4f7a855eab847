//! A scratch host for the hook binary and the CLI (`VIRT_TPM_STATE_ROOT`):
//! the layout libvirt makes, a machine state's readers that refuse an empty
//! or partial state dir, and the hook run as libvirt runs it.

use super::runner::{show, wait_output, Run, CLI_BIN, HOOK, RUN_TIMEOUT};
use super::states::{fixture_uuid, fixture_xml, St, NAME, VARS_REL};
use super::tree::{find_leftovers, stat_diff, stat_tree, StatTree};
use super::users::{as_user, chmod, chown, Users};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
        s.write(
            "elsewhere/host-file",
            "a host file the hook must never touch\n",
        );
        s
    }

    /// Writes etc/virt-tpm-state/config.toml: `store_after_stop = false`
    /// (no helper unless a test asks for one) plus `extra`.
    pub fn config(&self, extra: &str) {
        let text = if extra.contains("store_after_stop") {
            extra.to_string()
        } else {
            format!("store_after_stop = false\n{extra}")
        };
        self.write("etc/virt-tpm-state/config.toml", &text);
    }

    pub fn live_permall(&self) -> PathBuf {
        self.live_dir().join("tpm2-00.permall")
    }

    /// Every entry below the root with every stat field (see `tree`).
    pub fn stat_tree(&self) -> StatTree {
        stat_tree(&self.root())
    }

    /// The names next to the root: only `root` and what a test put there,
    /// so a path escaping the root shows up here.
    pub fn outside(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Runs a refused case and checks that nothing was written: the tree is
    /// identical (every stat field and content), except that the per-domain
    /// lock file (and its directories) may appear, and nothing appeared
    /// next to the root.
    pub fn refused(&self, op: &str, xml: &str, code: i32) -> Run {
        let before = self.stat_tree();
        let outside = self.outside();
        let run = self.hook(op, "begin", xml, &[]);
        run.failed(code);
        let lock = format!("run/virt-tpm-state/locks/{}.lock", self.uuid);
        let diff: Vec<String> = stat_diff(&before, &self.stat_tree())
            .into_iter()
            .filter(|d| {
                let p = &d[2..];
                !(d.starts_with('+')
                    && [
                        "run",
                        "run/virt-tpm-state",
                        "run/virt-tpm-state/locks",
                        &lock,
                    ]
                    .contains(&p))
            })
            .collect();
        assert!(
            diff.is_empty(),
            "a refused run changed the tree: {diff:?}{run}"
        );
        assert_eq!(
            self.outside(),
            outside,
            "something was created next to the root{run}"
        );
        run
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
    pub fn hook_command(&self, op: &str, subop: &str) -> Command {
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
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .env("HOME", "/root")
            .env("VIRT_TPM_STATE_ROOT", self.root())
            // Must not reach the post-stop helper (it gets a clean environment).
            .env("VTS_TEST_CANARY", "must-not-reach-the-helper")
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

    /// The hook with `xml` on its stdin (any bytes: the property tests
    /// feed it garbage), as libvirt runs it.
    pub fn hook(
        &self,
        op: &str,
        subop: &str,
        xml: impl AsRef<[u8]>,
        env: &[(&str, String)],
    ) -> Run {
        self.hook_umask(op, subop, xml, env, None)
    }

    /// [`Scratch::hook`] started under `umask` (e.g. "000").
    pub fn hook_umask(
        &self,
        op: &str,
        subop: &str,
        xml: impl AsRef<[u8]>,
        env: &[(&str, String)],
        umask: Option<&str>,
    ) -> Run {
        let mut cmd = self.hook_command_umask(op, subop, umask);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let start = std::time::Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the hook {HOOK}: {e}"));
        // Written by a thread, so a hook that stops reading still meets
        // the timeout.
        let mut stdin = child.stdin.take().unwrap();
        let input = xml.as_ref().to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = wait_output(child, RUN_TIMEOUT, &format!("the hook ({op} {subop})"));
        let elapsed = start.elapsed();
        let written = writer.join().expect("stdin writer");
        // A hook that exits before it read all of its stdin (an operation
        // it ignores, or a refusal) breaks the pipe: its exit status and
        // stderr say why; any other write error is the harness's.
        if let Err(e) = written {
            assert!(
                e.kind() == std::io::ErrorKind::BrokenPipe,
                "writing the hook's stdin: {e}\n{}",
                show(&out)
            );
        }
        Run {
            args: [NAME, op, subop, "-"].map(String::from).to_vec(),
            out,
            elapsed,
            root: self.root(),
        }
    }

    pub fn prepare(&self, xml: &str, env: &[(&str, String)]) -> Run {
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

    /// Asserts no temp marker is left below the root.
    pub fn assert_no_leftovers(&self, what: &str) {
        let left = self.leftovers();
        assert!(left.is_empty(), "{what}: left {left:?}");
    }

    /// The whole tree (path -> content digest or "dir"), without the lock
    /// files, to compare before and after a failed run.
    pub fn tree(&self) -> BTreeMap<String, String> {
        stat_tree(&self.root())
            .into_iter()
            // The lock dir and files are no state (made on the first lock).
            .filter(|(rel, _)| rel != "run" && !rel.starts_with("run/"))
            .map(|(rel, e)| {
                let v = if e.kind == 'd' {
                    "dir".to_string()
                } else {
                    e.extra
                };
                (rel, v)
            })
            .collect()
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
