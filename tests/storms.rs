//! The host's own lifecycle (issue 22): a shutdown storm that stops libvirtd
//! right after the last guest, against real libvirt, QEMU and swtpm in a
//! private world (tests/e2e/world.sh). A heavy job: `scripts/test-storms.sh`
//! (`.ci/run` runs it after `scripts/test.sh`); as root,
//! `cargo test --test storms -- --nocapture`. Without root or the tools it
//! prints `SKIP` and passes, unless `CI=true`.
//!
//! `VTS_STORM_VMS` sets the number of VMs (default 20).

#[macro_use]
mod common;

use common::{env::Env, world::*};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

fn storm_size() -> usize {
    std::env::var("VTS_STORM_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Runs `f` on every item, `threads` at a time.
fn par<T: Sync>(items: &[T], threads: usize, f: impl Fn(&T) + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(i) else { return };
                f(item);
            });
        }
    });
}

/// The element digest of a TPM 2.0 state that is this permall alone
/// (docs/FORMAT.md: sha256 of the sorted `tpm/<name> <sha256>` lines).
fn state_digest(permall: &[u8]) -> String {
    sha256_hex(format!("tpm/tpm2-00.permall {}\n", sha256_hex(permall)).as_bytes())
}

/// `digest` of our element in an XML text (libvirt's own config file, read
/// while libvirtd is down), if there is one.
fn element_digest(xml: &str) -> Option<String> {
    let start = xml.find("<vts:state")?;
    let tag = &xml[start..start + xml[start..].find('>')?];
    let at = tag.find(" digest=")? + " digest=".len();
    let quote = tag[at..].chars().next()?;
    let rest = &tag[at + 1..];
    Some(rest[..rest.find(quote)?].to_string())
}

/// The config copy's digest, from libvirt's file (works with libvirtd down).
fn config_digest(w: &World, vm: &Vm) -> Option<String> {
    let path = w.host_path(&format!("/etc/libvirt/qemu/{}.xml", vm.name));
    element_digest(&std::fs::read_to_string(&path).unwrap_or_default())
}

/// The digest a pending-store record of `vm` names, if there is one.
fn pending_digest(w: &World, vm: &Vm) -> Option<String> {
    let path = w.host_path(&format!("/var/lib/virt-tpm-state/pending/{}", vm.uuid));
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("digest "))
        .map(str::to_string)
}

fn pending_records(w: &World) -> usize {
    std::fs::read_dir(w.host_path("/var/lib/virt-tpm-state/pending"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

/// The rest of a host shutdown: whatever post-stop store still runs is
/// killed (systemd's final SIGKILL).
fn kill_helpers(w: &World) -> usize {
    let pids = w.after_stop_helpers();
    for p in &pids {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    pids.len()
}

/// Generation and digest of the config copy (`show --inactive`).
fn config_meta(w: &World, vm: &Vm) -> (u64, String, Option<String>) {
    let j = w.show_json(&vm.name, true);
    (
        j["generation"].as_u64().unwrap_or(0),
        j["digest"].as_str().unwrap_or_default().to_string(),
        j["parent"].as_str().map(str::to_string),
    )
}

/// One shutdown storm: every VM gets a new NV secret while stopped (so its
/// TPM changed since its last store), starts, and then all are stopped at
/// once; libvirtd gets SIGTERM right after the last stop returns and the
/// post-stop stores still running are killed. Until libvirtd is back, every
/// domain's final state must be in its config metadata or in a pending
/// record; returns (metadata before, final digests, pending count).
fn storm(w: &World, vms: &[Vm], tag: &str) -> (Vec<(u64, String)>, Vec<String>, usize) {
    par(vms, 4, |vm| {
        w.write_secret(vm, &format!("{tag}-{}", vm.name));
    });
    let before: Vec<(u64, String)> = vms
        .iter()
        .map(|vm| {
            let (g, d, _) = config_meta(w, vm);
            (g, d)
        })
        .collect();
    par(vms, 4, |vm| w.start(&vm.name, true));

    let t = Instant::now();
    let gate = Barrier::new(vms.len());
    par(vms, vms.len(), |vm| {
        gate.wait();
        w.must_virsh(&["destroy", &vm.name]);
    });
    w.stop_libvirtd();
    let killed = kill_helpers(w);
    eprintln!(
        "{tag}: {} VMs stopped and libvirtd gone in {:?}; {killed} post-stop store(s) still running were killed",
        vms.len(),
        t.elapsed()
    );

    let finals: Vec<String> = vms
        .iter()
        .map(|vm| state_digest(&w.must_permall(vm)))
        .collect();
    let mut pending = 0;
    for (vm, fin) in vms.iter().zip(&finals) {
        assert_ne!(
            &before[vms.iter().position(|v| v.uuid == vm.uuid).unwrap()].1,
            fin,
            "{}: the TPM did not change",
            vm.name
        );
        let cfg = config_digest(w, vm);
        let rec = pending_digest(w, vm);
        assert!(
            cfg.as_ref() == Some(fin) || rec.as_ref() == Some(fin),
            "{tag}: {}'s final state {fin} is neither in its config metadata ({cfg:?}) nor pending ({rec:?}): lost",
            vm.name
        );
        if let Some(r) = rec {
            assert_eq!(&r, fin, "{}: a pending record of another state", vm.name);
            pending += 1;
        }
    }
    eprintln!(
        "{tag}: {pending} of {} stores pending after libvirtd stopped",
        vms.len()
    );
    (before, finals, pending)
}

/// After completion: each config copy holds its final state exactly one
/// generation over the state before the storm (stored once, over the
/// state it replaced), and nothing is pending.
fn assert_final(w: &World, vms: &[Vm], before: &[(u64, String)], finals: &[String], tag: &str) {
    for ((vm, (g0, d0)), fin) in vms.iter().zip(before).zip(finals) {
        let (g, d, parent) = config_meta(w, vm);
        assert_eq!(
            &d, fin,
            "{tag}: {}: config metadata is not the final state",
            vm.name
        );
        assert_eq!(g, g0 + 1, "{tag}: {}: generation {g} after {g0}", vm.name);
        assert_eq!(parent.as_ref(), Some(d0), "{tag}: {}: parent", vm.name);
    }
    assert_eq!(pending_records(w), 0, "{tag}: records left");
    let again = stdout(&w.must_vts(&["sync", "--pending"]));
    assert!(
        again.contains("0 pending store(s) completed, 0 left"),
        "{tag}: a second sync found work:\n{again}"
    );
}

/// Done-when of issue 22: 20 running TPM VMs stopped at once, libvirtd
/// stopped right after; once libvirtd is back every config metadata holds
/// the final state, within the daemon's reconcile (daemon started while
/// libvirtd is still down: it completes them after connecting) and with
/// `sync --pending` where no daemon runs; stored once, over the state before.
#[test]
fn shutdown_storm_then_libvirtd_stop_loses_no_store() {
    require!(Env::Libvirt);
    let n = storm_size();
    let w = World::with_hook("storm");
    let vms: Vec<Vm> = (0..n)
        .map(|i| Vm::new(&format!("storm{i:02}"), Tpm::V2))
        .collect();
    par(&vms, 4, |vm| w.define(vm));
    par(&vms, 4, |vm| {
        w.start(&vm.name, false);
        w.must_virsh(&["destroy", &vm.name]);
    });
    w.wait_helpers();

    // 1. The watch daemon: started while libvirtd is down (a boot where it
    //    comes up first), it completes the pending stores once it connects.
    let (before, finals, pending) = storm(&w, &vms, "daemon");
    let d = Watch::start(&w, "storm");
    d.wait_log("libvirt unreachable", Duration::from_secs(10));
    w.start_libvirtd();
    let t = Instant::now();
    d.wait_log("libvirt reachable again", Duration::from_secs(30));
    while pending_records(&w) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "pending stores left 60 s after libvirtd came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "daemon: {pending} pending store(s) completed {:?} after libvirtd came back",
        t.elapsed()
    );
    assert_eq!(
        d.count("pending store completed") + d.count("pending store of digest"),
        pending,
        "one completion per pending record:\n{}",
        d.log()
    );
    assert_eq!(d.count("error:"), 0, "{}", d.log());
    drop(d);
    assert_final(&w, &vms, &before, &finals, "daemon");

    // 2. No daemon: `sync --pending` (the unit's boot line) completes them.
    let (before, finals, pending) = storm(&w, &vms, "sync");
    w.start_libvirtd();
    let status: serde_json::Value =
        serde_json::from_slice(&w.exec(&[VTS, "status", "--json"]).stdout).expect("status JSON");
    let listed = status["pending_stores"]
        .as_array()
        .expect("pending_stores")
        .len();
    assert_eq!(
        listed, pending,
        "status lists every pending store: {status:#}"
    );
    let out = w.must_vts(&["sync", "--pending", "--json"]);
    let sweep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sync JSON");
    let done = sweep["completed"].as_array().unwrap();
    assert_eq!(done.len(), pending, "{sweep:#}");
    assert!(
        done.iter().all(|c| c["result"] != "dropped"),
        "nothing here is stale: {sweep:#}"
    );
    assert_final(&w, &vms, &before, &finals, "sync");
}

/// The pending path never writes a stale state over a newer one, and never
/// stores twice: a post-stop store that never ran (its helper does nothing)
/// leaves records; one domain is redefined meanwhile with a newer state
/// from elsewhere. `status` lists both with their age; `sync --pending`
/// stores the one and drops the other (its metadata stays); a replayed
/// `store --after-stop` and a second sync write nothing.
#[test]
fn pending_store_never_overwrites_newer_metadata() {
    require!(Env::Libvirt);
    let w = World::with_hook("pending");
    let (a, b) = (Vm::new("pa", Tpm::V2), Vm::new("pb", Tpm::V2));
    w.manufacture(&a);
    w.manufacture(&b);
    // The post-stop store "was killed before it ran".
    let config = w.host_path("/etc/virt-tpm-state/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("helper_path"))
        .collect();
    std::fs::write(
        &config,
        format!("{}\nhelper_path = \"/bin/true\"\n", text.join("\n")),
    )
    .unwrap();
    for vm in [&a, &b] {
        w.write_secret(vm, "final");
        w.start(&vm.name, true);
        w.destroy(&vm.name);
    }
    let final_a = state_digest(&w.must_permall(&a));
    let final_b = state_digest(&w.must_permall(&b));
    assert_eq!(pending_digest(&w, &a), Some(final_a.clone()));
    assert_eq!(pending_digest(&w, &b), Some(final_b.clone()));
    let human = stdout(&w.must_vts(&["status"]));
    assert!(
        human.contains("pending post-stop stores: 2"),
        "status:\n{human}"
    );

    // Another host stored a newer state of `a`; a manager redefines it.
    let other = w.file("tpm2-00.permall");
    let (dump, _) = w.dump(&a.name, "pa-dump.xml", true);
    let b_permall = w.host_path(&b.state_dir()).join(b.tpm.permall());
    std::fs::copy(&b_permall, &other).unwrap();
    let newer = w.must_vts(&[
        "pack",
        "--uuid",
        &a.uuid,
        "--permall",
        &other.display().to_string(),
        "--host",
        "elsewhere",
        "--key",
        key_id(&w.keys()[0]),
        "--into",
        &dump.display().to_string(),
    ]);
    let redefined = w.file("pa-newer.xml");
    std::fs::write(&redefined, &newer.stdout).unwrap();
    w.must_virsh(&["define", &redefined.display().to_string()]);
    let (ga, da, _) = config_meta(&w, &a);
    assert_ne!(da, final_a);
    let (gb, _, _) = config_meta(&w, &b);

    let out = w.must_vts(&["sync", "--pending", "--json"]);
    let sweep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sync JSON");
    let result = |uuid: &str| {
        sweep["completed"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["uuid"] == uuid)
            .map(|c| c["result"].as_str().unwrap().to_string())
    };
    assert_eq!(result(&a.uuid).as_deref(), Some("dropped"), "{sweep:#}");
    assert_eq!(result(&b.uuid).as_deref(), Some("stored"), "{sweep:#}");
    let (ga2, da2, _) = config_meta(&w, &a);
    assert_eq!((ga2, &da2), (ga, &da), "the newer metadata was overwritten");
    let (gb2, db2, _) = config_meta(&w, &b);
    assert_eq!((gb2, db2.as_str()), (gb + 1, final_b.as_str()));
    // The kept copy of `a` stays (the next start decides and backs it up).
    assert!(w.host_path(&a.kept_dir()).join(a.tpm.permall()).is_file());
    assert_eq!(pending_records(&w), 0);

    // Replays write nothing: a post-stop store of `b` finds nothing pending.
    w.must_vts(&["store", "--after-stop", &b.uuid]);
    assert_eq!(config_meta(&w, &b).0, gb + 1, "stored twice");
    let again = stdout(&w.must_vts(&["sync", "--pending"]));
    assert!(again.contains("0 pending store(s) completed"), "{again}");
}
