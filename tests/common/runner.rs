//! Running the binaries under test: the hook as libvirt runs it (clean
//! environment, XML on stdin), never longer than [`RUN_TIMEOUT`], and the
//! checks every run gets (exit code, empty stdout, one line on failure),
//! each printing everything on failure.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

pub const HOOK: &str = env!("CARGO_BIN_EXE_virt-tpm-state-hook");
/// The CLI under test (`virt-tpm-state`).
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_virt-tpm-state");

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
