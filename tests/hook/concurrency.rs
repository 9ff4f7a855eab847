//! Concurrency (issue 9): many hooks on the same and on different domains
//! at once. Every run finishes (no deadlock: each waits at most
//! `lock_timeout_secs` for the per-domain lock), none corrupts anything (the
//! state dir, kept copy and J are each one whole input state), no temp
//! files remain, and a lock wait that times out fails with exit 9 and one
//! clear line, writing nothing.

use crate::common::{env::Env, runner::*, scratch::*, states::*, tree::*};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// A generous bound for a whole batch of parallel hooks (each takes
/// milliseconds; a lock wait is capped at 5 s by the scratch config):
/// reaching it means a deadlock.
const BATCH_BOUND: Duration = Duration::from_secs(120);

/// Waits for all `children`, killing them and failing past [`BATCH_BOUND`].
fn wait_all(children: Vec<Child>) -> Vec<Output> {
    let deadline = Instant::now() + BATCH_BOUND;
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    loop {
        let running: usize = children
            .iter_mut()
            .flatten()
            .map(|c| usize::from(c.try_wait().unwrap().is_none()))
            .sum();
        if running == 0 {
            break;
        }
        if Instant::now() > deadline {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
            panic!("{running} hooks still running after {BATCH_BOUND:?}: a deadlock");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .iter_mut()
        .map(|c| c.take().unwrap().wait_with_output().unwrap())
        .collect()
}

fn uuid(i: usize) -> String {
    format!("c0c0c0c0-0000-4000-8000-{i:012}")
}

#[test]
fn parallel_prepares_on_one_domain_leave_one_whole_state() {
    let s = Scratch::new();
    let states: Vec<St> = (0..12).map(|i| St::new(&format!("same/{i}"))).collect();
    let children = states
        .iter()
        .enumerate()
        .map(|(i, st)| s.spawn_hook("prepare", "begin", &xml_with(st, i as u64 + 1)))
        .collect();
    for (i, out) in wait_all(children).iter().enumerate() {
        ok(out, &format!("prepare {i}"));
    }
    let live = s.live().expect("a state dir");
    assert!(
        states.contains(&live),
        "the state dir is none of the inputs: corrupted"
    );
    assert_eq!(s.kept().as_ref(), Some(&live), "kept copy != state dir");
    assert_eq!(s.j(), Some(live.digest()), "J != state dir");
    for b in s.backups() {
        assert!(states.contains(&b), "a backup is none of the inputs");
    }
    s.assert_no_leftovers("after the race");
    // The last one to run won: running its XML again changes nothing.
    let winner = states.iter().position(|st| *st == live).unwrap();
    let before = s.tree();
    ok(
        &s.prepare(&xml_with(&live, winner as u64 + 1), &[]),
        "again",
    );
    assert_eq!(s.tree(), before);
}

#[test]
fn parallel_prepares_on_many_domains_stay_apart() {
    let s = Scratch::new();
    let n = 10;
    let states: Vec<St> = (0..n).map(|i| St::new(&format!("many/{i}"))).collect();
    // Two rounds, so the second replaces (with backups) what the first restored.
    for round in 0..2u64 {
        let children = (0..n)
            .map(|i| {
                let st = &states[(i + round as usize) % n];
                s.spawn_hook("prepare", "begin", &xml_for(st, round + 1, &uuid(i), false))
            })
            .collect();
        for (i, out) in wait_all(children).iter().enumerate() {
            ok(out, &format!("round {round}, domain {i}"));
        }
        for i in 0..n {
            let d = s.for_uuid(&uuid(i));
            let want = &states[(i + round as usize) % n];
            let want = St {
                permall: want.permall.clone(),
                vars: Vec::new(),
            };
            assert_eq!(
                d.live_tpm().as_ref(),
                Some(&want),
                "domain {i} after round {round}"
            );
            assert_eq!(d.kept().as_ref(), Some(&want), "domain {i}: kept copy");
            assert_eq!(d.j(), Some(want.digest()), "domain {i}: J");
        }
    }
    s.assert_no_leftovers("after the race");
}

#[test]
fn parallel_prepares_and_stops_on_one_domain_never_corrupt() {
    let s = Scratch::new();
    let states: Vec<St> = (0..8).map(|i| St::new(&format!("mixed/{i}"))).collect();
    ok(&s.prepare(&xml_with(&states[0], 1), &[]), "first restore");
    let mut children = Vec::new();
    for (i, st) in states.iter().enumerate() {
        children.push(s.spawn_hook("prepare", "begin", &xml_with(st, i as u64 + 1)));
        children.push(s.spawn_hook("stopped", "end", &xml_with(st, i as u64 + 1)));
    }
    for (i, out) in wait_all(children).iter().enumerate() {
        ok(out, &format!("hook {i}"));
    }
    let live = s.live().expect("a state dir");
    assert!(states.contains(&live), "state dir corrupted");
    let kept = s.kept().expect("a kept copy");
    assert!(states.contains(&kept), "kept copy corrupted");
    let j = s.j().expect("J");
    assert!(
        states.iter().any(|st| st.digest() == j),
        "J is no input's digest"
    );
    for b in s.backups() {
        assert!(states.contains(&b), "a backup is none of the inputs");
    }
    s.assert_no_leftovers("after the race");
}

/// Holds the domain's lock as another process would.
fn hold_lock(s: &Scratch) -> nix::fcntl::Flock<std::fs::File> {
    let dir = s.path("run/virt-tpm-state/locks");
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{}.lock", s.uuid)))
        .unwrap();
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("lock free")
}

#[test]
fn lock_wait_is_bounded_and_says_so() {
    let s = Scratch::new();
    s.write(
        "etc/virt-tpm-state/config.toml",
        "store_after_stop = false\nlock_timeout_secs = 1\n",
    );
    let a = St::new("lock/a");
    let b = St::new("lock/b");
    ok(&s.prepare(&xml_with(&a, 1), &[]), "restore A");
    let before = s.tree();
    let lock = hold_lock(&s);
    for (op, subop) in [("prepare", "begin"), ("stopped", "end")] {
        if op == "stopped" {
            // Something to keep, so `stopped` needs the lock.
            std::fs::write(s.live_dir().join("tpm2-00.permall"), &b.permall).unwrap();
        }
        let before = s.tree();
        let out = s.hook(op, subop, xml_with(&b, 2), &[]);
        let line = failed(&out, 9, &format!("{op} with the lock held"));
        assert!(
            line.contains("lock") && line.contains(&s.uuid) && line.contains("try again"),
            "unclear: {line}"
        );
        assert_eq!(s.tree(), before, "{op} wrote with the lock held elsewhere");
    }
    drop(lock);
    std::fs::write(s.live_dir().join("tpm2-00.permall"), &a.permall).unwrap();
    assert_eq!(s.tree().len(), before.len());
    ok(&s.prepare(&xml_with(&b, 2), &[]), "once the lock is free");
    assert_eq!(s.live().as_ref(), Some(&b));
    assert!(s.backups().contains(&a));
}

#[test]
fn different_domains_do_not_wait_for_each_other() {
    let s = Scratch::new();
    s.write(
        "etc/virt-tpm-state/config.toml",
        "store_after_stop = false\nlock_timeout_secs = 1\n",
    );
    let other = s.for_uuid(&uuid(99));
    let _lock = hold_lock(&other);
    let a = St::new("apart");
    ok(
        &s.prepare(&xml_with(&a, 1), &[]),
        "another domain's lock is held",
    );
    assert_eq!(s.live().as_ref(), Some(&a));
    assert_eq!(s.j(), Some(a.digest()));
}

/// Many `store`s (and `restore`s) at once on two domains of one private
/// libvirt world: all succeed, and each domain's metadata, J and local
/// state agree at the end.
#[test]
fn parallel_stores_in_a_world_agree() {
    require!(Env::Libvirt);
    let w = crate::common::world::World::without_post_stop_store("concurrent-stores");
    let vms = [
        crate::common::world::Vm::new("cvm1", crate::common::world::Tpm::V2),
        crate::common::world::Vm::new("cvm2", crate::common::world::Tpm::V2),
    ];
    for (i, vm) in vms.iter().enumerate() {
        w.manufacture(vm);
        w.must_vts(&["store", &vm.name]);
        w.write_secret(vm, &format!("concurrent-{i}"));
    }
    let outs: Vec<(String, Output)> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for vm in &vms {
            for k in 0..4 {
                let op = if k == 3 { "restore" } else { "store" };
                let name = vm.name.clone();
                let w = &w;
                handles.push(scope.spawn(move || {
                    (
                        format!("{op} {name}"),
                        w.exec(&[crate::common::world::VTS, op, &name]),
                    )
                }));
            }
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (what, out) in &outs {
        assert!(
            out.status.success(),
            "{what} failed\n{}",
            crate::common::world::describe(&[what], out)
        );
    }
    for vm in &vms {
        let permall = w.must_permall(vm);
        let j = w.show_json(&vm.name, true);
        assert_eq!(j["valid"], true, "{j:#}");
        assert_eq!(
            j["local"]["matches"], true,
            "{}: metadata != local state: {j:#}",
            vm.name
        );
        let journal = std::fs::read_to_string(
            w.host_path(&format!("/var/lib/virt-tpm-state/synced/{}", vm.uuid)),
        )
        .unwrap();
        assert_eq!(Some(journal.trim()), j["digest"].as_str(), "{}: J", vm.name);
        // A restore may run before the stores: it keeps the newer local state.
        assert_eq!(w.must_permall(vm), permall);
    }
    let mut left = Vec::new();
    for d in ["/var/lib/virt-tpm-state", "/var/lib/libvirt/swtpm"] {
        let p = w.host_path(d);
        find_leftovers(&p, &p, &mut left);
    }
    assert!(left.is_empty(), "{left:?}");
}
