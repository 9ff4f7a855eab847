//! Issue 16: the hook and the CLI, run as root on scratch roots
//! (`VIRT_TPM_STATE_ROOT`) laid out and owned as on Debian, against the real
//! less trusted users (`libvirt-qemu` owns `/var/lib/libvirt/qemu`, `tss`
//! owns each `tpm2/`; created with `useradd --system` when missing):
//!
//! - a racing symlink swapper running as the QEMU user during hundreds of
//!   hook runs never gets an outside dir chowned, chmodded or written;
//! - a symlinked nvram dir or swtpm base is refused (exit 7) and nothing
//!   outside is written; a missing nvram dir is refused (exit 8), not made;
//! - links are followed only in dirs no less trusted user can write: a
//!   root-made `/var/lib/libvirt` link (relocation) works, the same link in
//!   a dir others can write is refused;
//! - modes do not depend on the umask the hook was started with, and dirs
//!   that existed keep their owner and mode;
//! - a 20-level tree planted by `tss` in `tpm2/` leaves nothing behind;
//! - keys: a bad key file is named and skipped, a keys dir others can write
//!   refuses every sealed operation, plaintext needs no keys.
//!
//! Root, `setpriv`, `useradd` and python3 are needed, else `SKIP` (a
//! failure under `CI=true`). The world tests of the same issue (umask
//! wrapper, relocated `/var/lib/libvirt`) are in tests/worlds/nvram.rs.

use crate::common::{env::Env, runner::*, scratch::*, states::*, tree::*, users::*};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// Root and real users; python3 at the path the scripts below name.
const TRUST_ENV: &[Env] = &[
    Env::Root,
    Env::Cmd("setpriv"),
    Env::Cmd("useradd"),
    Env::Cmd("groupadd"),
    Env::Cmd("sh"),
    Env::File("/usr/bin/python3"),
];

/// A machine state with a small VARS file (the race encodes hundreds).
fn small(seed: &str) -> St {
    St {
        permall: St::new(seed).permall,
        vars: stream(&format!("{seed}/small-vars"), 4096),
    }
}

/// A prepare-begin XML builder: the state, its generation.
type XmlOf = fn(&St, u64) -> String;

/// The two ways a domain has VARS: libvirt picks the file, or `<nvram>` names it.
const NVRAM_FORMS: [(&str, XmlOf); 2] = [
    ("autoselected", xml_auto),
    ("explicit <nvram>", explicit_xml),
];

fn explicit_xml(st: &St, gen: u64) -> String {
    xml_for(st, gen, &fixture_uuid(&fixture_xml()), true)
}

fn tpm_only_xml(st: &St, gen: u64) -> String {
    xml_for(st, gen, &fixture_uuid(&fixture_xml()), false)
}

/// What a run changed below the root, without the lock dir (`run/`).
fn changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    meta_diff(before, after)
        .into_iter()
        .filter(|d| {
            let p = d[2..].split("  ").next().unwrap_or("");
            p != "run" && !p.starts_with("run/")
        })
        .collect()
}

/// Asserts the refused run left the scratch tree (below `run/`, the lock
/// dir, aside) as it was `before`.
fn assert_unchanged(s: &Scratch, before: &BTreeMap<String, String>, out: &Output, what: &str) {
    let after = meta_tree(&s.root(), &[]);
    let d = changes(before, &after);
    assert!(
        d.is_empty(),
        "{what}: changed\n{}\n{}\n--- tree ---\n{}",
        d.join("\n"),
        show(out),
        show_meta(&after)
    );
}

/// Asserts the run was refused as unsafe (7) with a line naming `link` and
/// saying it is a symlink.
fn refused_as_symlink(out: &Output, link: &str, what: &str) {
    let line = failed(out, 7, what);
    assert!(
        line.contains(link) && line.contains("symlink"),
        "{what}: the line must name {link} and say it is a symlink\n{}",
        show(out)
    );
}

/// Runs every case, also after one failed (each prints its own message),
/// then fails naming the failed ones: one run reports them all.
fn each_case<T>(cases: impl IntoIterator<Item = T>, name: impl Fn(&T) -> String, run: impl Fn(T)) {
    let mut failed = Vec::new();
    for c in cases {
        let n = name(&c);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(c))).is_err() {
            failed.push(n);
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}

/// An outside dir standing for `/etc`: root 0755, one file in it.
fn victim(s: &Scratch, name: &str) -> PathBuf {
    let v = s.path(name);
    std::fs::create_dir_all(&v).unwrap();
    chmod(&v, 0o755);
    std::fs::write(
        v.join("precious"),
        "a host file the hook must never touch\n",
    )
    .unwrap();
    chmod(&v.join("precious"), 0o644);
    v
}

// ================================================================ a. the racing swapper

/// Runs as the QEMU user: renames `nvram` away, puts a link to a victim in
/// its place, takes it out again and puts the dir back (every 4th time it
/// empties and removes the dir and makes a new one instead), as fast as it
/// can with short random pauses (so that some runs get through), until the
/// stop file appears or the time is up. Prints its counts.
const SWAPPER: &str = r#"
import os, random, sys, time
qemu, victims, secs, stop = sys.argv[1], sys.argv[2].split(':'), float(sys.argv[3]), sys.argv[4]
os.umask(0o022)
nv = os.path.join(qemu, 'nvram')
away = os.path.join(qemu, 'nvram.away')
deadline = time.monotonic() + secs
def empty(d):
    for n in os.listdir(d):
        os.unlink(os.path.join(d, n))
def sane():
    if os.path.islink(nv):
        os.unlink(nv)
    if not os.path.lexists(nv):
        if os.path.isdir(away) and not os.path.islink(away):
            os.rename(away, nv)
        else:
            os.mkdir(nv, 0o755)
i = links = recreated = errors = 0
open(os.path.join(qemu, '.swapper-ready'), 'w').close()
while time.monotonic() < deadline and not os.path.exists(stop):
    i += 1
    try:
        os.rename(nv, away)
        os.symlink(victims[i % len(victims)], nv)
        links += 1
        os.unlink(nv)
        if i % 4 == 0:
            empty(away)
            os.rmdir(away)
            os.mkdir(nv, 0o755)
            recreated += 1
        else:
            os.rename(away, nv)
        # Now and then nvram stays in place a moment, so that hook runs
        # also get through (and race the swap at every step).
        if random.random() < 0.5:
            time.sleep(random.random() * 0.001)
    except OSError:
        errors += 1
        try:
            sane()
        except OSError:
            pass
for _ in range(10):
    try:
        sane()
        break
    except OSError:
        time.sleep(0.01)
print(f'iterations={i} links={links} recreated={recreated} errors={errors}', flush=True)
"#;

/// The swapper process, killed on drop (also when the test panics).
struct Swapper {
    child: Option<Child>,
    stop: PathBuf,
}

impl Swapper {
    fn start(s: &Scratch, u: &Users, victims: &[&Path], secs: u32) -> Swapper {
        let stop = s.tmp.path().join("swapper.stop");
        let victims: Vec<String> = victims.iter().map(|v| v.display().to_string()).collect();
        let qemu = s.path("var/lib/libvirt/qemu").display().to_string();
        let child = as_user(
            u.qemu_uid,
            u.qemu_gid,
            &[
                "/usr/bin/python3",
                "-c",
                SWAPPER,
                &qemu,
                &victims.join(":"),
                &secs.to_string(),
                &stop.display().to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the swapper");
        let mut sw = Swapper {
            child: Some(child),
            stop,
        };
        // Running (as the QEMU user) before the first hook run.
        let t = Instant::now();
        let ready = s.path("var/lib/libvirt/qemu/.swapper-ready");
        while !ready.exists() {
            if let Some(st) = sw.child.as_mut().unwrap().try_wait().unwrap() {
                let out = sw.child.take().unwrap().wait_with_output().unwrap();
                panic!("the swapper exited at once ({st})\n{}", show(&out));
            }
            assert!(t.elapsed() < Duration::from_secs(10), "swapper not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        sw
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Asks it to stop (it puts `nvram` back as a dir); its output.
    fn stop(mut self) -> Output {
        std::fs::write(&self.stop, "").unwrap();
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait_with_output().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn racing_nvram_swapper_never_gets_an_outside_dir() {
    require!(Env::All(TRUST_ENV));
    // A count of runs, not a time budget: on a loaded machine each run is
    // slower, never fewer (the swapper outlives them all and is stopped).
    const RUNS: usize = 200;
    let u = users();
    let s = Scratch::debian(&u);
    let v1 = victim(&s, "victim");
    // A dir standing for /etc: the product's own config dir's parent.
    let v2 = s.path("etc");
    let root = s.root();
    // Everything that exists now, outside the QEMU user's dir (which it may
    // change at will), must keep owner, mode and content: the victims, the
    // dirs from the root down to /var/lib/libvirt, qemu.conf, the config.
    let qemu_rel = "var/lib/libvirt/qemu";
    let watched: Vec<(String, String)> = meta_tree(&root, &[qemu_rel]).into_iter().collect();
    let qemu_dir_meta = meta_of(&s.path(qemu_rel));
    let victims_before = [meta_tree(&v1, &[]), meta_tree(&v2, &[])];
    let check = |what: &str, out: Option<&Output>| {
        let mut bad = Vec::new();
        for (v, b) in [&v1, &v2].iter().zip(&victims_before) {
            for d in meta_diff(b, &meta_tree(v, &[])) {
                bad.push(format!("victim {}: {d}", v.display()));
            }
        }
        for (rel, was) in &watched {
            let now = meta_of(&root.join(rel));
            if &now != was {
                bad.push(format!("~ {rel}  {was}  =>  {now}"));
            }
        }
        let now = meta_of(&s.path(qemu_rel));
        if now != qemu_dir_meta {
            bad.push(format!("~ {qemu_rel}  {qemu_dir_meta}  =>  {now}"));
        }
        // Nothing outside the QEMU user's dir may belong to it: VARS files
        // only ever go into nvram.
        for (rel, uid, gid) in owners(&root, &[qemu_rel]) {
            if rel != qemu_rel && (uid == u.qemu_uid || gid == u.qemu_gid) {
                bad.push(format!("! {rel} belongs to the QEMU user: {uid}:{gid}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: outside the nvram dir, something changed:\n{}\n{}\n--- tree now ---\n{}",
            bad.join("\n"),
            out.map(show).unwrap_or_default(),
            show_meta(&meta_tree(&root, &[]))
        );
    };

    let mut sw = Swapper::start(&s, &u, &[&v1, &v2], 3600);
    let t = Instant::now();
    let mut tally: BTreeMap<i32, usize> = BTreeMap::new();
    let mut samples: BTreeMap<i32, String> = BTreeMap::new();
    let mut malformed: Vec<String> = Vec::new();
    let mut runs = 0;
    for i in 0..RUNS {
        // A new state every run, so that every run really restores.
        let st = small(&format!("race-{i}"));
        let out = s.prepare(&xml_auto(&st, i as u64 + 1), &[]);
        let what = format!("hook run {i} of {RUNS} (swapper running)");
        // The security checks first (they stop the test at once); how the
        // run ended is tallied, and its form checked after the race.
        check(&what, Some(&out));
        let code = out.status.code().unwrap_or(-1);
        *tally.entry(code).or_default() += 1;
        runs += 1;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let well_formed = out.stdout.is_empty()
            && match code {
                0 => true,
                7 | 8 => err.lines().count() == 1 && err.starts_with("virt-tpm-state: "),
                _ => false,
            };
        if code != 0 {
            samples.entry(code).or_insert_with(|| err.clone());
        }
        if !well_formed {
            malformed.push(format!("{what}\n{}", show(&out)));
        }
    }
    assert!(sw.alive(), "the swapper stopped before the hook runs did");
    let sw_out = sw.stop();
    let stats = String::from_utf8_lossy(&sw_out.stdout).trim().to_string();
    let elapsed = t.elapsed();
    eprintln!(
        "race: {runs} hook runs in {elapsed:?}, outcomes (exit code: runs) {tally:?}, swapper: {stats}\n\
         first refusal per code: {samples:#?}"
    );
    check("after the race", None);
    assert_eq!(runs, RUNS);
    let links: usize = stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("links="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no swapper counts: {}", show(&sw_out)));
    assert!(
        links >= runs,
        "the swapper put only {links} links in place during {runs} runs: {}",
        show(&sw_out)
    );
    assert!(
        malformed.is_empty(),
        "{} of {runs} runs did not end in exit 0, or 7/8 with one line (first 3 shown):\n{}",
        malformed.len(),
        malformed[..malformed.len().min(3)].join("\n")
    );
    let ok_runs = tally.get(&0).copied().unwrap_or(0);
    assert!(
        ok_runs >= 20,
        "only {ok_runs} of {runs} runs restored: the race proves little ({tally:?})"
    );

    // Afterwards, with nvram in place, a run restores as usual, with
    // libvirt's owner and mode.
    let nvram = s.path("var/lib/libvirt/qemu/nvram");
    assert_eq!(
        meta_of(&nvram).split(' ').take(2).collect::<Vec<_>>(),
        ["dir", &format!("{}:{}", u.qemu_uid, u.qemu_gid)],
        "the swapper did not put nvram back: {}",
        meta_of(&nvram)
    );
    let last = small("race-final");
    let out = s.prepare(&xml_auto(&last, RUNS as u64 + 10), &[]);
    ok(&out, "the run after the race");
    assert_eq!(
        std::fs::read(s.path(AUTO_VARS_REL)).unwrap(),
        last.vars,
        "VARS not restored"
    );
    assert_eq!(
        stat_of(&s.path(AUTO_VARS_REL)),
        Om(u.qemu_uid, u.qemu_gid, 0o600)
    );
    assert_eq!(s.live_tpm().map(|t| t.permall), Some(last.permall));
    check("the run after the race", Some(&out));
}

// ================================================================ b. links where the state goes

#[test]
fn symlinked_nvram_dir_is_refused_and_nothing_outside_is_written() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    each_case(
        NVRAM_FORMS,
        |(f, _)| f.to_string(),
        |(form, xml)| {
            let s = Scratch::debian(&u);
            let a = St::new("nvram-link-a");
            ok(
                &s.prepare(&xml(&a, 1), &[]),
                &format!("{form}: first restore"),
            );
            let outside = victim(&s, "outside");
            // The QEMU user's doing: nvram moved aside, a link in its place.
            let qemu = s.path("var/lib/libvirt/qemu");
            must_as_user(
                u.qemu_uid,
                u.qemu_gid,
                &[
                    "sh",
                    "-c",
                    "cd \"$1\" && mv nvram nvram.moved && ln -s \"$2\" nvram",
                    "sh",
                    &qemu.display().to_string(),
                    &outside.display().to_string(),
                ],
            );
            let before = meta_tree(&s.root(), &[]);
            let out = s.prepare(&xml(&St::new("nvram-link-b"), 2), &[]);
            let what = format!("{form}: prepare with nvram a link to an outside dir");
            refused_as_symlink(&out, "var/lib/libvirt/qemu/nvram", &what);
            assert_unchanged(&s, &before, &out, &what);
            // The previous state, and the sync record, as they were.
            assert_eq!(s.live_tpm().map(|t| t.permall), Some(a.permall.clone()));
            assert_eq!(s.j(), Some(a.digest()), "{what}: J");
        },
    );
}

#[test]
fn symlinked_swtpm_base_is_refused_and_nothing_outside_is_written() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let forms: [(&str, XmlOf); 2] = [("TPM only", tpm_only_xml), ("UEFI autoselected", xml_auto)];
    let cases = forms.into_iter().flat_map(|f| [(f, false), (f, true)]);
    each_case(
        cases,
        |((f, _), p)| format!("{f}, prior state: {p}"),
        |((form, xml), prior)| {
            let what = format!(
                "{form}, swtpm base a link to {}",
                if prior {
                    "the moved base holding the previous state"
                } else {
                    "an outside dir"
                }
            );
            let s = Scratch::debian(&u);
            let a = St::new("swtpm-link-a");
            let base = s.path("var/lib/libvirt/swtpm");
            let outside = s.path("outside-swtpm");
            if prior {
                ok(
                    &s.prepare(&xml(&a, 1), &[]),
                    &format!("{what}: first restore"),
                );
                std::fs::rename(&base, &outside).unwrap();
            } else {
                victim(&s, "outside-swtpm");
            }
            // Made by root: still refused, the anchor itself is never followed.
            std::os::unix::fs::symlink(&outside, &base).unwrap();
            let before = meta_tree(&s.root(), &[]);
            let out = s.prepare(&xml(&St::new("swtpm-link-b"), 2), &[]);
            refused_as_symlink(&out, "var/lib/libvirt/swtpm", &what);
            assert_unchanged(&s, &before, &out, &what);
        },
    );
}

// ================================================================ the trust rule above the anchors

/// Moves `var/lib/libvirt` to `var/lib/libvirt-real` and puts a link (made
/// by root, relative) in its place, as an admin relocating libvirt does.
fn relocate(s: &Scratch) -> PathBuf {
    let real = s.path("var/lib/libvirt-real");
    std::fs::rename(s.path("var/lib/libvirt"), &real).unwrap();
    std::os::unix::fs::symlink("libvirt-real", s.path("var/lib/libvirt")).unwrap();
    real
}

#[test]
fn relocated_var_lib_libvirt_by_root_is_followed() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    // /var/lib root 0755, and root 1777 (sticky: a root-owned link in it is
    // protected): both trusted. The swtpm base made by libvirt before, or
    // still missing (the hook makes it, through the link).
    let cases = [0o755, 0o1777]
        .into_iter()
        .flat_map(|m| [(m, true), (m, false)]);
    each_case(
        cases,
        |(m, b)| format!("var/lib {m:o}, swtpm base exists: {b}"),
        |(var_lib_mode, base_exists)| {
            let what = format!(
                "var/lib {var_lib_mode:o}, var/lib/libvirt a root-made link, swtpm base {}",
                if base_exists {
                    "made by libvirt"
                } else {
                    "missing"
                }
            );
            let s = Scratch::debian(&u);
            let real = relocate(&s);
            if base_exists {
                std::fs::create_dir(real.join("swtpm")).unwrap();
                chmod(&real.join("swtpm"), 0o711);
            }
            chmod(&s.path("var/lib"), var_lib_mode);
            let live = real.join(format!("swtpm/{}/tpm2/tpm2-00.permall", s.uuid));

            // Firmware autoselection: libvirt's default VARS path.
            let a = St::new("reloc-a");
            let out = s.prepare(&xml_auto(&a, 1), &[]);
            ok(&out, &format!("{what}: autoselected"));
            assert_eq!(std::fs::read(&live).ok(), Some(a.permall.clone()), "{what}");
            assert_eq!(
                stat_of(&real.join("swtpm")),
                Om(0, 0, 0o711),
                "{what}: swtpm base"
            );
            let vars_a = real.join("qemu/nvram/tpm2-with-metadata_VARS.fd");
            assert_eq!(std::fs::read(&vars_a).ok(), Some(a.vars.clone()), "{what}");
            assert_eq!(
                stat_of(&vars_a),
                Om(u.qemu_uid, u.qemu_gid, 0o600),
                "{what}"
            );

            // An explicit <nvram> path through the link.
            let b = St::new("reloc-b");
            let out = s.prepare(&explicit_xml(&b, 2), &[]);
            ok(&out, &format!("{what}: explicit <nvram>"));
            assert_eq!(std::fs::read(&live).ok(), Some(b.permall.clone()), "{what}");
            let vars_b = real.join("qemu/nvram/faults_VARS.fd");
            assert_eq!(std::fs::read(&vars_b).ok(), Some(b.vars.clone()), "{what}");

            // The guest ran: stopped end reads the final state through the
            // link (the post-stop store reads it the same way).
            let c = St::new("reloc-c");
            std::fs::write(&live, &c.permall).unwrap();
            std::fs::write(&vars_b, &c.vars).unwrap();
            let out = s.hook("stopped", "end", explicit_xml(&b, 2), &[]);
            ok(&out, &format!("{what}: stopped end"));
            assert_eq!(
                s.kept(),
                Some(c.clone()),
                "{what}: kept copy\n{}",
                show(&out)
            );
            s.assert_no_leftovers(&what);
            assert_eq!(
                stat_of(&s.path("var/lib")),
                Om(0, 0, var_lib_mode),
                "{what}"
            );
        },
    );
}

#[test]
fn links_in_dirs_others_can_write_are_never_followed() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    // (what, owner of var/lib, its mode, owner of the link)
    let cases = [
        (
            "var/lib owned by tss",
            (u.tss_uid, u.tss_gid),
            0o755,
            (0, 0),
        ),
        ("var/lib 0777 without sticky", (0, 0), 0o777, (0, 0)),
        (
            "var/lib group-writable (tss)",
            (0, u.tss_gid),
            0o775,
            (0, 0),
        ),
        (
            "var/lib 1777, the link owned by tss",
            (0, 0),
            0o1777,
            (u.tss_uid, u.tss_gid),
        ),
    ];
    each_case(
        cases,
        |c| c.0.to_string(),
        |(what, (uid, gid), mode, (luid, lgid))| {
            let s = Scratch::debian(&u);
            let real = relocate(&s);
            // As libvirt left it after its first TPM VM.
            std::fs::create_dir(real.join("swtpm")).unwrap();
            chmod(&real.join("swtpm"), 0o711);
            let a = St::new("untrusted-a");
            ok(
                &s.prepare(&xml_auto(&a, 1), &[]),
                &format!("{what}: first restore, var/lib still root 0755"),
            );
            chown(&s.path("var/lib"), uid, gid);
            chmod(&s.path("var/lib"), mode);
            chown(&s.path("var/lib/libvirt"), luid, lgid);
            for (form, xml) in [
                ("autoselected", xml_auto(&St::new("untrusted-b"), 2)),
                ("explicit <nvram>", explicit_xml(&St::new("untrusted-b"), 2)),
            ] {
                let what = format!("{what}, {form}");
                let before = meta_tree(&s.root(), &[]);
                let out = s.prepare(&xml, &[]);
                refused_as_symlink(&out, "var/lib/libvirt", &what);
                assert_unchanged(&s, &before, &out, &what);
            }
            assert_eq!(
                std::fs::read(real.join(format!("swtpm/{}/tpm2/tpm2-00.permall", s.uuid))).ok(),
                Some(a.permall),
                "{what}: previous state"
            );
        },
    );
}

// ================================================================ libvirt's dirs are libvirt's

#[test]
fn missing_nvram_dir_is_refused_not_created() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    each_case(
        NVRAM_FORMS,
        |(f, _)| f.to_string(),
        |(form, xml)| {
            let what = format!("{form}: VARS to restore, libvirt's nvram dir missing");
            let s = Scratch::debian(&u);
            std::fs::remove_dir(s.path("var/lib/libvirt/qemu/nvram")).unwrap();
            let before = meta_tree(&s.root(), &[]);
            let out = s.prepare(&xml(&St::new("no-nvram"), 1), &[]);
            let line = failed(&out, 8, &what);
            // Firmware autoselection: the product's own wording. An explicit
            // path: any clear "does not exist".
            let says = if form == "autoselected" {
                line.contains("not exist")
            } else {
                line.contains("not exist") || line.contains("No such file")
            };
            assert!(
                line.contains("var/lib/libvirt/qemu/nvram") && says,
                "{what}: the line must say libvirt's nvram dir does not exist\n{}",
                show(&out)
            );
            assert_unchanged(&s, &before, &out, &what);
        },
    );
}

#[test]
fn modes_do_not_depend_on_the_umask() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    each_case(
        ["000", "022", "077"],
        |m| format!("umask {m}"),
        |umask| {
            let what = format!("hook under umask {umask}, fresh host");
            let s = Scratch::debian(&u);
            let base = s.path("var/lib/libvirt/swtpm");
            assert!(!base.exists());
            let before = meta_tree(&s.root(), &[]);
            let a = St::new(&format!("umask-{umask}"));
            let out = s.hook_umask("prepare", "begin", xml_auto(&a, 1), &[], Some(umask));
            ok(&out, &what);
            let after = meta_tree(&s.root(), &[]);
            let tree = || show_meta(&after);
            let uuid_dir = base.join(&s.uuid);
            let live = s.live_dir();
            let vars = s.path(AUTO_VARS_REL);
            for (p, want) in [
                (&base, Om(0, 0, 0o711)),
                (&uuid_dir, Om(0, 0, 0o711)),
                (&live, Om(u.tss_uid, u.tss_gid, 0o700)),
                (
                    &live.join("tpm2-00.permall"),
                    Om(u.tss_uid, u.tss_gid, 0o600),
                ),
                (&vars, Om(u.qemu_uid, u.qemu_gid, 0o600)),
            ] {
                assert_eq!(
                    stat_of(p),
                    want,
                    "{what}: owner and mode of {}\n{}",
                    p.display(),
                    tree()
                );
            }
            assert_eq!(std::fs::read(&vars).unwrap(), a.vars, "{what}");
            assert_eq!(s.live_tpm().map(|t| t.permall), Some(a.permall), "{what}");
            // Nothing the hook made is writable by group or others, and no dir
            // that existed changed.
            let mut bad = Vec::new();
            for d in meta_diff(&before, &after) {
                let m = d.rsplit("  (").next().unwrap_or("");
                let mode = m
                    .split(' ')
                    .nth(2)
                    .and_then(|x| u32::from_str_radix(x.trim_end_matches(')'), 8).ok());
                match (d.as_bytes()[0], mode) {
                    (b'+', Some(mode)) if m.starts_with("link") || mode & 0o022 == 0 => {}
                    _ => bad.push(d),
                }
            }
            assert!(
                bad.is_empty(),
                "{what}: changed dirs, or made entries others can write:\n{}\n{}",
                bad.join("\n"),
                tree()
            );
        },
    );
}

#[test]
fn existing_dirs_keep_their_owner_and_mode() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let s = Scratch::debian(&u);
    // Made by someone else before (an older libvirt, an admin), with modes
    // the product would not choose itself.
    let base = s.path("var/lib/libvirt/swtpm");
    let uuid_dir = base.join(&s.uuid);
    let data = s.path("var/lib/virt-tpm-state");
    std::fs::create_dir_all(&uuid_dir).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    chown(&base, 0, u.tss_gid);
    chmod(&base, 0o750);
    chmod(&uuid_dir, 0o755);
    chmod(&data, 0o751);
    let watched = [
        base.clone(),
        uuid_dir.clone(),
        data.clone(),
        s.path("var/lib/libvirt"),
        s.path("var/lib/libvirt/qemu"),
        s.path("var/lib/libvirt/qemu/nvram"),
    ];
    let before: Vec<String> = watched.iter().map(|p| meta_of(p)).collect();
    let a = St::new("existing");
    let out = s.hook_umask("prepare", "begin", xml_auto(&a, 1), &[], Some("000"));
    ok(&out, "restore under umask 000 into existing dirs");
    assert_eq!(s.live_tpm().map(|t| t.permall), Some(a.permall));
    let after: Vec<String> = watched.iter().map(|p| meta_of(p)).collect();
    for ((p, b), a) in watched.iter().zip(&before).zip(&after) {
        assert_eq!(
            b,
            a,
            "owner or mode of {} changed\n{}",
            p.display(),
            show_meta(&meta_tree(&s.root(), &[]))
        );
    }
}

// ================================================================ d. removal has no depth limit

#[test]
fn deep_tree_planted_by_tss_leaves_nothing_behind() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let s = Scratch::debian(&u);
    let outside = victim(&s, "victim");
    let a = St::new("deep-a");
    ok(&s.prepare(&tpm_only_xml(&a, 1), &[]), "first restore");
    let live = s.live_dir();
    assert_eq!(stat_of(&live).0, u.tss_uid, "tpm2 not tss's");
    // As tss (it owns tpm2/): 20 levels, a file at each, links out at the
    // bottom, and a dir halfway made unreadable.
    must_as_user(
        u.tss_uid,
        u.tss_gid,
        &[
            "sh",
            "-c",
            r#"set -e; cd "$1"; p=.
               for i in $(seq -w 1 20); do p=$p/l$i; mkdir "$p"; echo junk >"$p/f"; done
               ln -s "$2" "$p/escape"; ln -s "$2/precious" "$p/escape-file"
               mkfifo "$p/fifo"
               chmod 000 ./l01/l02/l03/l04/l05/l06/l07/l08/l09/l10"#,
            "sh",
            &live.display().to_string(),
            &outside.display().to_string(),
        ],
    );
    let deepest = (1..=20).fold(live.clone(), |p, i| p.join(format!("l{i:02}")));
    assert!(
        std::fs::symlink_metadata(deepest.join("escape")).is_ok(),
        "the planted tree is not there"
    );
    let victim_before = meta_tree(&outside, &[]);

    // Newer metadata: the state dir is replaced, the old one removed.
    let b = St::new("deep-b");
    let out = s.prepare(&tpm_only_xml(&b, 2), &[]);
    ok(&out, "restore over the planted tree");
    let tree = show_meta(&meta_tree(&s.root(), &[]));
    assert!(
        s.leftovers().is_empty(),
        "leftovers {:?}\n{}\n{tree}",
        s.leftovers(),
        show(&out)
    );
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(live.parent().unwrap()), ["tpm2"], "{tree}");
    assert_eq!(names(&live), ["tpm2-00.permall"], "{tree}");
    assert_eq!(s.live_tpm().map(|t| t.permall), Some(b.permall), "{tree}");
    let planted: Vec<String> = meta_tree(&s.root(), &[])
        .into_keys()
        .filter(|k| k.contains("/l01") || k.ends_with("escape"))
        .collect();
    assert!(
        planted.is_empty(),
        "planted entries remain: {planted:?}\n{tree}"
    );
    assert!(
        s.backups().iter().any(|st| st.permall == a.permall),
        "the replaced state is not in the backups\n{tree}"
    );
    assert_eq!(
        meta_tree(&outside, &[]),
        victim_before,
        "the victim changed"
    );
}

// ================================================================ f. keys

const NEW_KEY: &str = "20260101T000000Z-f01e608db5c1c5c4.key";
const OLD_KEY: &str = "20250101T000000Z-a969ca0c7ba0a7cb.key";
/// sha256 of the permall every ok vector carries.
const VECTOR_PERMALL: &str = "82e0d42619a5a2b70f10c0345896ec9c6b46546d35d72201dc9717e35c48afe4";
const VECTOR_UUID: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vectors")
}

fn vector(name: &str) -> String {
    std::fs::read_to_string(vectors().join(name)).unwrap()
}

/// `etc/virt-tpm-state/keys`, root 0700, holding `NEW_KEY` (root 0600).
fn keys_dir(s: &Scratch) -> PathBuf {
    let dir = s.path("etc/virt-tpm-state/keys");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o700);
    put_key(&dir, NEW_KEY, 0o600, (0, 0));
    dir
}

fn put_key(dir: &Path, name: &str, mode: u32, (uid, gid): (u32, u32)) {
    std::fs::copy(vectors().join("keys").join(name), dir.join(name)).unwrap();
    chown(&dir.join(name), uid, gid);
    chmod(&dir.join(name), mode);
}

/// The vector's permall restored by the hook into the default state dir.
fn vector_restored(s: &Scratch) -> Option<String> {
    let p = s.path(&format!(
        "var/lib/libvirt/swtpm/{VECTOR_UUID}/tpm2/tpm2-00.permall"
    ));
    std::fs::read(p)
        .ok()
        .map(|d| crate::common::world::sha256_hex(&d))
}

fn json_of(out: &Output, what: &str) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e})\n{}", show(out)))
}

#[test]
fn a_bad_key_file_is_named_and_skipped_for_other_keys() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let garbage = "20240101T000000Z-0123456789abcdef.key";
    let foreign = "20240201T000000Z-fedcba9876543210.key";
    let setup = || {
        let s = Scratch::debian(&u);
        let dir = keys_dir(&s);
        put_key(&dir, OLD_KEY, 0o644, (0, 0));
        std::fs::write(dir.join(garbage), "not a key\n").unwrap();
        chmod(&dir.join(garbage), 0o600);
        std::fs::write(
            dir.join(foreign),
            "bm90IHJvb3QncyBrZXkgYnV0IDMyIGJ5dGVzIGxvbmch\n",
        )
        .unwrap();
        chown(&dir.join(foreign), u.tss_uid, u.tss_gid);
        chmod(&dir.join(foreign), 0o600);
        s
    };
    let s = setup();
    let xml = s.tmp.path().join("sealed.xml");
    std::fs::write(&xml, vector("ok-encrypted.xml")).unwrap();
    let what = "show of an element sealed with the good key, bad key files beside it";
    let out = s.cli(&["show", "--json", "--xml", xml.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{what}\n{}", show(&out));
    let j = json_of(&out, what);
    assert_eq!(j["valid"], true, "{what}: {j:#}\n{}", show(&out));
    assert_eq!(j["protection"], "virt-tpm-state:f01e608db5c1c5c4", "{j:#}");
    let err = String::from_utf8_lossy(&out.stderr);
    for bad in [OLD_KEY, garbage, foreign] {
        assert!(
            err.contains(bad),
            "{what}: the bad key file {bad} is not named\n{}",
            show(&out)
        );
    }
    // The hook restores it.
    let out = s.prepare(&vector("ok-encrypted.xml"), &[]);
    assert_eq!(out.status.code(), Some(0), "hook: {}", show(&out));
    assert_eq!(
        vector_restored(&s).as_deref(),
        Some(VECTOR_PERMALL),
        "hook did not restore the sealed state\n{}",
        show(&out)
    );

    // An element sealed with the key whose file is bad does not open, and
    // the refusal names that key; nothing is written.
    let s = setup();
    let before = meta_tree(&s.root(), &[]);
    let out = s.prepare(&vector("ok-encrypted-older-key.xml"), &[]);
    let what = "hook, element sealed with the bad-mode key";
    assert!(
        matches!(out.status.code(), Some(7) | Some(19)) && out.stdout.is_empty(),
        "{what}: expected exit 7 or 19\n{}",
        show(&out)
    );
    // One line, naming the key and its unusable file (the skipped files
    // are named in syslog and by `show`, not in the hook's refusal).
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.lines().count() == 1
            && err.starts_with("virt-tpm-state: ")
            && err.contains("a969ca0c7ba0a7cb")
            && err.contains(OLD_KEY),
        "{what}: expected one line naming the key and its file\n{}",
        show(&out)
    );
    assert_unchanged(&s, &before, &out, what);
}

#[test]
fn keys_dir_others_can_write_refuses_every_sealed_operation() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let dirs = [
        ("root 0777", (0, 0), 0o777),
        ("root:tss 0770", (0, u.tss_gid), 0o770),
        ("owned by tss 0700", (u.tss_uid, u.tss_gid), 0o700),
    ];
    let cases = dirs
        .into_iter()
        .flat_map(|d| ["show", "hook", "plaintext hook"].map(|op| (d, op)));
    each_case(
        cases,
        |((case, _, _), op)| format!("keys dir {case}: {op}"),
        |((case, (uid, gid), mode), op)| {
            let s = Scratch::debian(&u);
            let dir = keys_dir(&s);
            chown(&dir, uid, gid);
            chmod(&dir, mode);
            let xml = s.tmp.path().join("sealed.xml");
            std::fs::write(&xml, vector("ok-encrypted.xml")).unwrap();
            let what = format!("keys dir {case}: {op}");
            let refused = |out: &Output| {
                let line = failed(out, 7, &what);
                assert!(
                    line.contains("etc/virt-tpm-state/keys")
                        && (line.contains("chmod") || line.contains("chown")),
                    "{what}: the line must name the keys dir and the fix\n{}",
                    show(out)
                );
            };
            match op {
                "show" => {
                    // (with --json, stdout carries the same refusal as an
                    // error object: docs/JSON.md, tests/cli/manager.rs)
                    refused(&s.cli(&["show", "--xml", xml.to_str().unwrap()], None));
                    let out = s.cli(&["show", "--json", "--xml", xml.to_str().unwrap()], None);
                    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    assert_eq!(j["error"]["kind"], "unsafe-path", "{what}");
                    assert_eq!(j["error"]["exit"], 7, "{what}");
                }
                "hook" => {
                    let before = meta_tree(&s.root(), &[]);
                    let out = s.prepare(&vector("ok-encrypted.xml"), &[]);
                    refused(&out);
                    assert_unchanged(&s, &before, &out, &what);
                }
                _ => {
                    // A plaintext element needs no key: restored all the same.
                    let out = s.prepare(&vector("ok-tpm2.xml"), &[]);
                    assert_eq!(out.status.code(), Some(0), "{what}\n{}", show(&out));
                    assert_eq!(
                        vector_restored(&s).as_deref(),
                        Some(VECTOR_PERMALL),
                        "{what}"
                    );
                }
            }
        },
    );
}

#[test]
fn plaintext_show_and_extract_need_no_keys() {
    require!(Env::All(TRUST_ENV));
    let u = users();
    let s = Scratch::debian(&u);
    keys_dir(&s);
    let xml = s.tmp.path().join("plain.xml");
    std::fs::write(&xml, vector("ok-tpm2.xml")).unwrap();
    chmod(&xml, 0o644);
    // A place the user may write to.
    let home = s.tmp.path().join("user");
    std::fs::create_dir(&home).unwrap();
    chown(&home, u.tss_uid, u.tss_gid);
    let out_dir = home.join("extracted");
    let user = Some((u.tss_uid, u.tss_gid));

    let out = s.cli(&["show", "--json", "--xml", xml.to_str().unwrap()], user);
    assert_eq!(out.status.code(), Some(0), "show as tss\n{}", show(&out));
    let j = json_of(&out, "show as tss");
    assert_eq!(j["valid"], true, "{j:#}\n{}", show(&out));
    assert_eq!(j["protection"], "none", "{j:#}");

    let out = s.cli(
        &[
            "extract",
            "--xml",
            xml.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        user,
    );
    assert_eq!(out.status.code(), Some(0), "extract as tss\n{}", show(&out));
    let permall = std::fs::read(out_dir.join("tpm2-00.permall")).unwrap_or_default();
    assert_eq!(
        crate::common::world::sha256_hex(&permall),
        VECTOR_PERMALL,
        "{}",
        show(&out)
    );
    assert_eq!(stat_of(&out_dir.join("tpm2-00.permall")).0, u.tss_uid);
}
