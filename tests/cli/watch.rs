//! End-to-end tests of `virt-tpm-state watch` (the daemon) and `status`,
//! against real libvirt, QEMU and swtpm in private worlds
//! (tests/e2e/world.sh). Same rules as tests/worlds/e2e.rs: run as root,
//! `cargo test --test watch -- --nocapture`; without root or the tools they
//! print `SKIP` and pass, unless `CI=true`.
//!
//! `VTS_WATCH_IDLE_SECS` sets how long the idle test watches an idle host
//! (default 60 s with a full reconcile every 15 s: four reconciles that must
//! write nothing; the ten-minute window is a benchmark, docs/BENCHMARKS.md).

use crate::common::{env::Env, world::*};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// A change that looks like swtpm's: a complete new file written beside the
/// state file and renamed over it (`n` makes each change distinct).
fn swtpm_like_write(w: &World, vm: &Vm, n: u64) -> Vec<u8> {
    let dir = w.host_path(&vm.state_dir());
    let path = dir.join(vm.tpm.permall());
    let mut data = std::fs::read(&path).expect("read permall");
    let len = data.len();
    data[len - 8..].copy_from_slice(&n.to_be_bytes());
    let tmp = dir.join("TMP2-00.permall");
    std::fs::write(&tmp, &data).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    data
}

fn generation(j: &serde_json::Value) -> u64 {
    j["generation"].as_u64().unwrap_or(0)
}

/// Waits until the live and (for a persistent domain) config metadata hold
/// the local state; returns how long that took.
fn wait_synced(w: &World, vm: &Vm, persistent: bool, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let live = w.show_json(&vm.name, false);
        let cfg_ok = !persistent || w.show_json(&vm.name, true)["local"]["matches"] == true;
        if live["local"]["matches"] == true && cfg_ok {
            return t.elapsed();
        }
        if t.elapsed() > limit {
            panic!(
                "metadata did not catch up within {limit:?}:\nlive: {live:#}\n{}",
                w.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
}

/// A world with the hook installed and `vm` running (paused) with a manufactured TPM.
fn running_vm(tag: &str, name: &str) -> (World, Vm) {
    let w = World::with_hook(tag);
    let vm = Vm::new(name, Tpm::V2);
    w.manufacture(&vm);
    // Paused: active for libvirt (swtpm runs, the daemon watches it), but
    // the guest's firmware sends no TPM commands of its own, so every change
    // is the test's.
    w.start(&vm.name, true);
    (w, vm)
}

/// [`running_vm`] with the daemon started (its log tagged `log`) and done
/// with its start-up reconcile: the state libvirt's start changed is stored.
fn watched_vm(tag: &str, name: &str, log: &str) -> (World, Vm, Watch) {
    let (w, vm) = running_vm(tag, name);
    let d = Watch::start(&w, log);
    wait_synced(&w, &vm, true, Duration::from_secs(15));
    (w, vm, d)
}

#[test]
fn watch_syncs_a_change_into_live_and_config() {
    require!(Env::Libvirt);
    let (w, vm, d) = watched_vm("watch-sync", "wvm", "sync");
    let before = generation(&w.show_json(&vm.name, true));
    let stores = d.count("stored generation");

    for n in 1..=3u64 {
        swtpm_like_write(&w, &vm, n);
        let took = wait_synced(&w, &vm, true, Duration::from_secs(1 + 5));
        eprintln!("change {n}: live and config metadata hold it after {took:?} (settle 1 s)");
    }
    let after = w.show_json(&vm.name, true);
    assert_eq!(generation(&after), before + 3, "{after:#}");
    assert_eq!(d.count("stored generation"), stores + 3, "{}", d.log());

    // status: in sync, exit 0; --json parses.
    let out = w.must_vts(&["status"]);
    let text = stdout(&out);
    assert!(
        text.contains("in sync") && text.contains("running (pid"),
        "{text}"
    );
    let j: serde_json::Value =
        serde_json::from_slice(&w.must_vts(&["status", "--json"]).stdout).expect("status --json");
    let row = &j["domains"][0];
    assert_eq!(row["in_sync"], true, "{j:#}");
    assert_eq!(row["generation"], before + 3, "{j:#}");

    // A second daemon refuses to run.
    let out = w.vts(&["watch"]);
    assert!(!out.status.success(), "a second daemon ran");
    assert!(stderr(&out).contains("another `virt-tpm-state watch`"));

    // SIGHUP reloads the config: a valid change is taken...
    w.append_config("settle_interval_ms = 700");
    d.hup();
    d.wait_log(
        "configuration reloaded (settle 700 ms",
        Duration::from_secs(10),
    );
    // ...an invalid one is refused with one line, and the daemon keeps
    // working with the previous configuration.
    w.append_config("no_such_key = 1");
    d.hup();
    d.wait_log(
        "keeping the previous configuration",
        Duration::from_secs(10),
    );
    // Repair the file for the CLI calls below, without telling the daemon:
    // the next change is synced under the configuration it kept.
    let cfg = w.host_path("/etc/virt-tpm-state/config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("no_such_key = 1\n", "")).unwrap();
    swtpm_like_write(&w, &vm, 4);
    wait_synced(&w, &vm, true, Duration::from_secs(1 + 5));
    assert_eq!(
        generation(&w.show_json(&vm.name, true)),
        before + 4,
        "{}",
        d.log()
    );

    // SIGTERM: clean exit 0.
    let st = d.term();
    assert!(st.success(), "exit status on SIGTERM: {st}");

    // Out of sync with no daemon: status says so, and exits 20 past the lag.
    swtpm_like_write(&w, &vm, 99);
    let out = w.vts(&["status", "--max-lag", "0"]);
    std::thread::sleep(Duration::from_millis(1100));
    let out2 = w.vts(&["status", "--max-lag", "0"]);
    assert!(stdout(&out).contains("OUT OF SYNC"), "{}", stdout(&out));
    assert_eq!(
        out2.status.code(),
        Some(20),
        "{}",
        describe(&["status"], &out2)
    );
    let out = w.vts(&["status", "--max-lag", "3600"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["status"], &out)
    );
}

#[test]
fn watch_survives_libvirtd_restart() {
    require!(Env::Libvirt);
    let (w, vm, d) = watched_vm("watch-restart", "rvm", "restart");

    w.stop_libvirtd();
    // A change while libvirt is away, then a few seconds of outage.
    let data = swtpm_like_write(&w, &vm, 7);
    std::thread::sleep(Duration::from_secs(6));
    d.wait_log("libvirt unreachable", Duration::from_secs(5));
    w.start_libvirtd();
    let took = wait_synced(&w, &vm, true, Duration::from_secs(20));
    eprintln!("synced {took:?} after libvirtd came back");
    assert_eq!(w.must_permall(&vm), data);
    d.wait_log("libvirt reachable again", Duration::from_secs(5));
    assert_eq!(d.count("libvirt unreachable"), 1, "{}", d.log());
    assert_eq!(d.count("libvirt reachable again"), 1, "{}", d.log());
    assert_eq!(d.count("error:"), 0, "{}", d.log());
}

#[test]
fn watch_killed_mid_store_leaves_valid_metadata() {
    require!(Env::Libvirt);
    let (w, vm) = running_vm("watch-kill", "kvm1");
    let mut kills = 0;
    for n in 0..12u64 {
        let d = Watch::start(&w, &format!("kill{n}"));
        swtpm_like_write(&w, &vm, 1000 + n);
        // Kill somewhere in the settle read, the libvirt calls or the writes.
        let delay = 900 + (n * 137) % 700;
        std::thread::sleep(Duration::from_millis(delay));
        d.kill9();
        kills += 1;
        for inactive in [false, true] {
            let j = w.show_json(&vm.name, inactive);
            assert_eq!(
                j["valid"],
                true,
                "after kill -9 #{n} ({delay} ms) the {} metadata is not valid: {j:#}",
                if inactive { "config" } else { "live" }
            );
        }
    }
    // A daemon started again finishes the job.
    let _d = Watch::start(&w, "final");
    wait_synced(&w, &vm, true, Duration::from_secs(15));
    eprintln!("{kills} kill -9 during stores: metadata valid every time, synced afterwards");
}

#[test]
fn watch_undefine_while_watched_no_error_loop() {
    require!(Env::Libvirt);
    let (w, vm, d) = watched_vm("watch-undef", "uvm", "undef");
    // Undefined while running: it is transient now, still watched (live only).
    w.must_virsh(&["undefine", &vm.name]);
    std::thread::sleep(Duration::from_secs(1));
    swtpm_like_write(&w, &vm, 42);
    wait_synced(&w, &vm, false, Duration::from_secs(6));
    w.destroy(&vm.name);
    d.wait_log("no longer running here", Duration::from_secs(5));
    let lines = d.log().lines().count();
    std::thread::sleep(Duration::from_secs(5));
    let log = d.log();
    assert_eq!(
        log.lines().count(),
        lines,
        "the daemon kept logging:\n{log}"
    );
    assert_eq!(d.count("error:"), 0, "{log}");
    assert_eq!(d.count("warn:"), 0, "{log}");
}

#[test]
fn watch_idle_host_is_left_alone() {
    require!(Env::Libvirt);
    let secs: u64 = std::env::var("VTS_WATCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (w, vm) = running_vm("watch-idle", "ivm");
    // A few full reconciles inside the window: they too must write nothing.
    let reconcile = (secs / 4).max(5);
    w.append_config(&format!("reconcile_interval_secs = {reconcile}"));
    let d = Watch::start(&w, "idle");
    wait_synced(&w, &vm, true, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(3));

    let config = w.host_path(&format!("/etc/libvirt/qemu/{}.xml", vm.name));
    let status_xml = w.host_path(&format!("/run/libvirt/qemu/{}.xml", vm.name));
    let journal = w.host_path(&format!("/var/lib/virt-tpm-state/synced/{}", vm.uuid));
    let status_json = w.host_path("/run/virt-tpm-state/status.json");
    let files = [&config, &status_xml, &journal, &status_json];
    let before: Vec<SystemTime> = files.iter().map(|p| mtime(p)).collect();
    let gen = generation(&w.show_json(&vm.name, true));
    let stored = d.count("stored generation");
    let cpu = d.cpu_ticks();
    eprintln!(
        "idle test: {secs} s of nothing (reconcile every {reconcile} s); checking that {} stay untouched, no store is logged, the generation stays {gen}",
        files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    std::thread::sleep(Duration::from_secs(secs));
    let after: Vec<SystemTime> = files.iter().map(|p| mtime(p)).collect();
    let cpu = d.cpu_ticks() - cpu;
    eprintln!("idle test: daemon CPU time over {secs} s: {cpu} ticks (1/100 s)");
    for ((p, b), a) in files.iter().zip(&before).zip(&after) {
        assert_eq!(b, a, "{} was modified while idle", p.display());
    }
    assert_eq!(d.count("stored generation"), stored, "{}", d.log());
    assert_eq!(generation(&w.show_json(&vm.name, true)), gen);
    assert_eq!(d.count("error:") + d.count("warn:"), 0, "{}", d.log());
}

/// The unit file `install` places: its ExecStart line is the one `install`
/// rewrites, and it passes `systemd-analyze verify` where that exists.
#[test]
fn watch_unit_file_verifies() {
    let unit = std::fs::read_to_string(root_dir().join("dist/virt-tpm-state-watch.service"))
        .expect("dist/virt-tpm-state-watch.service");
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/virt-tpm-state watch"),
        "install rewrites exactly this ExecStart line"
    );
    for key in [
        "After=libvirtd.service virtqemud.service",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/virt-tpm-state /run/virt-tpm-state",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == key), "unit lacks {key}");
    }
    require!(Env::Cmd("systemd-analyze"));
    let analyze = "systemd-analyze";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("virt-tpm-state-watch.service");
    std::fs::write(
        &path,
        unit.replace(
            "ExecStart=/usr/bin/virt-tpm-state watch",
            &format!("ExecStart={VTS} watch"),
        ),
    )
    .unwrap();
    // The unit names its man page (man:virt-tpm-state-watch(1)), which the
    // package installs and this host need not have: tests/package.rs
    // verifies the unit with the page installed.
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        describe(&["systemd-analyze", "verify"], &out)
    );
}

/// Without systemd (a re-rooted tree stands for such a host), `install`
/// places no unit and says how to run the daemon.
#[test]
fn install_without_systemd_says_how_to_run_watch() {
    require!(Env::Root);
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(VTS)
        .args([
            "install",
            "--no-reload",
            "--hook",
            concat!(env!("CARGO_BIN_EXE_virt-tpm-state"), "-hook"),
        ])
        .env("VIRT_TPM_STATE_ROOT", root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&["install"], &out));
    let text = stdout(&out);
    assert!(
        text.contains("systemd is not running here") && text.contains(" watch` under"),
        "{text}"
    );
    assert!(!root
        .path()
        .join("etc/systemd/system/virt-tpm-state-watch.service")
        .exists());
    let out = Command::new(VTS)
        .args(["install", "--no-reload", "--no-watch", "--hook"])
        .arg(concat!(env!("CARGO_BIN_EXE_virt-tpm-state"), "-hook"))
        .env("VIRT_TPM_STATE_ROOT", root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&["install"], &out));
    assert!(!stdout(&out).contains("systemd"), "{}", stdout(&out));
}
