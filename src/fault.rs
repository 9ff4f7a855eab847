//! Named fault points for the fault-injection tests (`tests/hook/faults.rs`).
//!
//! Every step of a restore or a store that changes the disk has a point
//! here. Built without the `fault-injection` feature (every release and
//! package build) `point` is an inlined `Ok(())`: no environment is read
//! and nothing can be injected into the hook that runs as root.
//!
//! With the feature, `VIRT_TPM_STATE_FAULT=NAME[#N]=ACTION[,...]` fires at
//! the Nth hit (every hit without `#N`) of point NAME in this process:
//! `kill` sends SIGKILL to the process right there (a crash between two
//! steps), `eio`/`enospc`/`erofs`/`exdev` make the step fail with that
//! error. `VIRT_TPM_STATE_FAULT_TRACE=FILE` appends every hit's name to FILE,
//! so a test learns the exact sequence of steps a run takes and can kill it
//! at each one, and can check that every listed point is reached.
//!
//! Not the `fail` crate: the tests need the list of points and a trace of
//! the hits, which it does not keep, and the hit-count and kill actions are
//! a dozen lines here.

/// Whether this build has fault points (tests refuse to pass without them).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// The fault specification.
pub const FAULT_ENV: &str = "VIRT_TPM_STATE_FAULT";
/// Where hits are traced.
pub const TRACE_ENV: &str = "VIRT_TPM_STATE_FAULT_TRACE";

/// Every fault point, in the order a full restore reaches them.
pub const POINTS: &[&str] = &[
    // prepare (src/restore/)
    "restore.locked",
    "restore.backed_up",
    // the restore journal (fs::HostData::write_intent / clear_intent)
    "restore.intent",
    "restore.written",
    "restore.synced",
    "restore.intent_cleared",
    // a directory built aside and swapped in (fs::replace_dir): state
    // dirs, kept copies, backups
    "dir.created",
    "dir.write",
    "dir.filled",
    "dir.rename",
    "dir.swapped",
    "dir.old_removed",
    // a file replaced atomically (fs::write_file_atomically): J
    "file.created",
    "file.write",
    "file.rename",
    "file.renamed",
    // the VARS file (fs::NvramLocation::replace)
    "nvram.created",
    "nvram.write",
    "nvram.rename",
    "nvram.renamed",
    // replace_file() for a `<source type='file'>` TPM state file
    "statefile.created",
    "statefile.write",
    "statefile.rename",
    "statefile.renamed",
    // HostData::record_sync: kept copy written, J not yet
    "sync.kept",
    // store (src/store/apply.rs)
    "store.settled",
    "store.metadata_set",
];

/// Reaches fault point `name`: `Err` when a fault is injected there.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn point(_name: &'static str) -> std::io::Result<()> {
    Ok(())
}

/// Reaches fault point `name`: `Err` when a fault is injected there.
#[cfg(feature = "fault-injection")]
pub(crate) fn point(name: &'static str) -> std::io::Result<()> {
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::sync::Mutex;
    static HITS: Mutex<BTreeMap<&'static str, u32>> = Mutex::new(BTreeMap::new());

    assert!(POINTS.contains(&name), "fault point {name} is not listed");
    let hit = {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let n = hits.entry(name).or_insert(0);
        *n += 1;
        *n
    };
    if let Some(trace) = std::env::var_os(TRACE_ENV) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(trace)
            .expect("fault trace file");
        // One write per line: parallel processes may share the file.
        f.write_all(format!("{name}\n").as_bytes())
            .expect("fault trace write");
    }
    let Some(spec) = std::env::var_os(FAULT_ENV) else {
        return Ok(());
    };
    for rule in spec.to_string_lossy().split(',') {
        let Some((at, action)) = rule.split_once('=') else {
            continue;
        };
        let (point, nth) = match at.split_once('#') {
            Some((p, n)) => (p, n.parse::<u32>().ok()),
            None => (at, None),
        };
        if point != name || nth.is_some_and(|n| n != hit) {
            continue;
        }
        let errno = match action {
            "kill" => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(std::process::id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // SIGKILL cannot be caught; wait for it to land.
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            "eio" => nix::libc::EIO,
            "enospc" => nix::libc::ENOSPC,
            "erofs" => nix::libc::EROFS,
            "exdev" => nix::libc::EXDEV,
            other => panic!("unknown fault action {other:?} in {FAULT_ENV}"),
        };
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    Ok(())
}
