//! Running the binaries under test: the hook as libvirt runs it (clean
//! environment, XML on stdin), never longer than [`RUN_TIMEOUT`], and the
//! checks every run gets (exit code, empty stdout, one line on failure),
//! each printing everything on failure.

use super::tree::{show_stat_tree, stat_tree};
use std::fmt;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The hook crate's binary (hooks/), which cargo puts next to the CLI, where
/// `install` looks for it too: built by `scripts/build-hook.sh` (alone, so
/// without the CLI's libvirt feature), not by cargo for this package's tests.
pub const HOOK: &str = concat!(env!("CARGO_BIN_EXE_virt-tpm-state"), "-hook");
/// The CLI under test (`virt-tpm-state`).
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_virt-tpm-state");

/// One run of the hook on a scratch host: what it printed, how long it
/// took, and (when shown, i.e. on a failed check) the whole scratch tree.
/// Derefs to its [`Output`], so the checks below take it too.
pub struct Run {
    pub args: Vec<String>,
    pub out: Output,
    pub elapsed: Duration,
    /// The scratch root, listed when the run is shown.
    pub root: PathBuf,
}

impl std::ops::Deref for Run {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.out
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n--- hook {:?}", self.args)?;
        writeln!(
            f,
            "exit code: {:?} (signal {:?}) after {:?}",
            self.status.code(),
            self.status.signal(),
            self.elapsed
        )?;
        writeln!(f, "stdout: {:?}", String::from_utf8_lossy(&self.stdout))?;
        writeln!(f, "stderr: {:?}", self.err())?;
        write!(
            f,
            "scratch tree {}:\n{}",
            self.root.display(),
            show_stat_tree(&stat_tree(&self.root))
        )
    }
}

impl Run {
    /// Its stderr, as text.
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Exit 0, nothing on stdout or stderr.
    pub fn ok(&self) -> &Self {
        assert_eq!(self.status.code(), Some(0), "expected success{self}");
        assert!(self.stdout.is_empty(), "stdout must stay empty{self}");
        assert!(
            self.stderr.is_empty(),
            "stderr must be empty on success{self}"
        );
        self
    }

    /// Exit `code`, nothing on stdout, one line on stderr saying who speaks.
    pub fn failed(&self, code: i32) -> &Self {
        let err = self.err();
        assert_eq!(
            self.status.code(),
            Some(code),
            "expected exit code {code}{self}"
        );
        assert!(self.stdout.is_empty(), "stdout must stay empty{self}");
        assert_eq!(
            err.lines().count(),
            1,
            "stderr must be exactly one line{self}"
        );
        assert!(err.ends_with('\n'), "{self}");
        assert!(
            err.starts_with("virt-tpm-state: "),
            "stderr line must say who speaks{self}"
        );
        self
    }

    /// Its stderr holds each of `parts`.
    pub fn says(&self, parts: &[&str]) -> &Self {
        let err = self.err();
        for p in parts {
            assert!(err.contains(p), "stderr lacks {p:?}{self}");
        }
        self
    }
}

/// No hook run may take longer than this.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for `child` (stdout and stderr piped) like `wait_with_output`, but
/// kills it and panics with what it printed so far after `limit`.
pub fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let reader = |p: Option<std::process::ChildStdout>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let stdout = reader(out_pipe.take());
    let stderr = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut p) = err_pipe.take() {
            let _ = p.read_to_end(&mut v);
        }
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the child") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let out = Output {
                status: std::process::ExitStatus::from_raw(9),
                stdout: stdout.join().unwrap_or_default(),
                stderr: stderr.join().unwrap_or_default(),
            };
            panic!(
                "{what} did not exit within {limit:?}; killed\n{}",
                show(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
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

/// Runs `cmd` with `input` on its stdin; its output. A child that exits
/// before reading all of it is not an error here: its exit says what it did.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Runs `cmd` (a tool the test uses, not a binary under test), which must
/// succeed; its output, everything printed when it did not.
pub fn must_run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(out.status.success(), "{what}\n{}", show(&out));
    out
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

/// The file names a `show --json` lists, in its order (the element's:
/// sorted by name).
pub fn json_file_names(show: &serde_json::Value) -> Vec<&str> {
    show["files"]
        .as_array()
        .unwrap_or_else(|| panic!("show --json has no files array: {show:#}"))
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect()
}
