#!/usr/bin/env python3
"""benches/storms.py - boot and shutdown storms (issue 22), as root:

    sudo benches/storms.py            # prints a Markdown section on stdout

Rows (each hook run as libvirt runs it: clean environment, domain XML on stdin,
re-rooted with VIRT_TPM_STATE_ROOT into a scratch host on the real disk, so
every fsync counts; the release build of scripts/build-release.sh):

  A. boot storm: N concurrent `prepare begin` hooks, each restoring its own
     domain's state from its metadata (no state dir yet), vs one alone;
  B. shutdown storm, the hook's part: N concurrent `stopped end` hooks, each
     keeping a copy of a changed final state and recording the pending store
     (`store_after_stop`, helper /bin/true), vs one alone;
  C. the same two with the scratch host on a tmpfs (/dev/shm): no disk, so
     the difference to A/B is what fsync and the disk cost;
  D. gc::enforce in the hook: one `stopped end` with DATA_DOMAINS other
     domains' data in the data dir (kept copy, BACKUPS backups, J each) vs an
     empty data dir (enforce walks the whole data dir before each new copy);
  E. shutdown storm, the store's part: N concurrent `store --after-stop` in a
     private libvirt world (tests/e2e/world.sh) completing the pending stores
     of N defined, stopped domains (through libvirtd: virDomainSetMetadata),
     vs one alone.

Per-VM cost = each process's own wall time (spawn to exit); the ratio is the
storm's median per-VM cost over the single run's median. Every run must exit
0 (a lock timeout is exit 9): failures are counted and shown.

Environment: ONLY=D (row D alone), N (default 50), ROUNDS (storm rounds, default 5), SINGLE_RUNS
(default 20), DATA_DOMAINS (default 500), BACKUPS (default 5), BENCH_DIR
(default target/bench-storms), VTS_BIN / HOOK_BIN (default: build them with
scripts/build-release.sh).
"""

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid as uuidlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("N", "50"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
SINGLE_RUNS = int(os.environ.get("SINGLE_RUNS", "20"))
DATA_DOMAINS = int(os.environ.get("DATA_DOMAINS", "500"))
BACKUPS = int(os.environ.get("BACKUPS", "5"))
OUT = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(REPO, "target/bench-storms")))
PERMALL = open(os.path.join(REPO, "benches/data/tpm2-00.permall"), "rb").read()


def log(*a):
    print("storms.py:", *a, file=sys.stderr, flush=True)


def binaries():
    vts, hook = os.environ.get("VTS_BIN"), os.environ.get("HOOK_BIN")
    if vts and hook:
        return vts, hook
    out = subprocess.run([os.path.join(REPO, "scripts/build-release.sh")], check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], out[1]


VTS, HOOK = binaries()


def state(seed, n):
    """A distinct valid permall: the real one with its last 8 bytes set
    (swtpm's header, which the tools check, stays valid)."""
    return PERMALL[:-8] + (seed * 1_000_003 + n).to_bytes(8, "big")


def domain_xml(name, uuid):
    kind = "kvm" if os.path.exists("/dev/kvm") else "qemu"
    return (f"<domain type='{kind}'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
            "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
            "</devices></domain>\n")


def write(path, data, mode=0o600):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.chmod(path, mode)


def libvirt_state(root, uuid, permall):
    """A domain's swtpm state as libvirt leaves it: <uuid> 0711 root,
    tpm2/ 0700 and the permall 0600, both tss's (qemu.conf's default)."""
    import pwd
    tss = pwd.getpwnam("tss")
    top = os.path.join(root, f"var/lib/libvirt/swtpm/{uuid}")
    live = os.path.join(top, "tpm2/tpm2-00.permall")
    write(live, permall)
    os.chmod(top, 0o711)
    os.chmod(os.path.dirname(live), 0o700)
    for p in (os.path.dirname(live), live):
        os.chown(p, tss.pw_uid, tss.pw_gid)
    return live


def packed_xml(work, name, uuid, permall, seal=("--plaintext",)):
    """The domain XML with our element carrying `permall` (plaintext), made
    by the CLI's own `pack`."""
    d = os.path.join(work, "pack", uuid)
    write(os.path.join(d, "tpm2-00.permall"), permall)
    write(os.path.join(d, "domain.xml"), domain_xml(name, uuid))
    return subprocess.run([VTS, "pack", "--uuid", uuid, "--permall",
                           os.path.join(d, "tpm2-00.permall"), *seal,
                           "--into", os.path.join(d, "domain.xml")],
                          check=True, capture_output=True, text=True).stdout


class Host:
    """A scratch host under `base` (a re-rooted tree for the hook)."""

    def __init__(self, base, config):
        self.root = os.path.join(base, "root")
        shutil.rmtree(base, ignore_errors=True)
        write(os.path.join(self.root, "etc/libvirt/qemu.conf"),
              'swtpm_user = "+0"\nswtpm_group = "+0"\nuser = "+0"\ngroup = "+0"\n', 0o644)
        write(os.path.join(self.root, "etc/virt-tpm-state/config.toml"), config, 0o644)
        os.makedirs(os.path.join(self.root, "var/lib/libvirt/swtpm"), exist_ok=True)

    def reset(self):
        for rel in ["var/lib/libvirt/swtpm", "var/lib/virt-tpm-state", "run/virt-tpm-state"]:
            shutil.rmtree(os.path.join(self.root, rel), ignore_errors=True)
        os.makedirs(os.path.join(self.root, "var/lib/libvirt/swtpm"), exist_ok=True)

    def live(self, uuid):
        return os.path.join(self.root, f"var/lib/libvirt/swtpm/{uuid}/tpm2/tpm2-00.permall")

    def hook_cmd(self, name, op, subop):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "VIRT_TPM_STATE_ROOT": self.root}
        return [HOOK, name, op, subop, "-"], env


def run_at_once(cmds):
    """Starts every (argv, env, stdin) at once (threads behind a barrier);
    returns [(seconds, exit code, stderr)]."""
    results = [None] * len(cmds)
    gate = threading.Barrier(len(cmds))

    def one(i, argv, env, stdin):
        gate.wait()
        t = time.monotonic()
        p = subprocess.run(argv, env=env, input=stdin, capture_output=True)
        results[i] = (time.monotonic() - t, p.returncode, p.stderr.decode(errors="replace"))

    threads = [threading.Thread(target=one, args=(i, *c)) for i, c in enumerate(cmds)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def summary(single, storm, walls):
    ok = [r for r in storm if r[1] == 0]
    fails = [r for r in storm + single if r[1] != 0]
    s_med = statistics.median(r[0] for r in single)
    per = sorted(r[0] for r in storm)
    p95 = per[min(len(per) - 1, int(len(per) * 0.95))]
    return {
        "single": s_med,
        "median": statistics.median(per),
        "p95": p95,
        "max": per[-1],
        "wall": statistics.median(walls),
        "ratio": statistics.median(per) / s_med,
        "amortised": statistics.median(walls) / len(storm) * len(walls),
        "amortised_ratio": statistics.median(walls) / len(storm) * len(walls) / s_med,
        "fails": len(fails),
        "lock_timeouts": sum(1 for r in fails if r[1] == 9),
        "ok": len(ok),
        "first_failure": fails[0][2].strip()[:200] if fails else "",
    }


def ms(x):
    return f"{x * 1000:.1f} ms"


def hook_storm(base, op):
    """Rows A/B (and C with base on a tmpfs)."""
    cfg = "lock_timeout_secs = 30\nallow_plaintext = true\n"
    if op == "stopped":
        cfg += 'store_after_stop = true\nhelper_path = "/bin/true"\n'
    h = Host(base, cfg)
    uuids = [str(uuidlib.uuid4()) for _ in range(N)]
    xmls = [packed_xml(base, f"vm{i}", u, state(1, i)).encode() for i, u in enumerate(uuids)]

    def prepare_round(k, restore_only):
        h.reset()
        if op == "prepare":
            cmds = []
            for i in range(k):
                argv, env = h.hook_cmd(f"vm{i}", "prepare", "begin")
                cmds.append((argv, env, xmls[i]))
            return cmds
        # stopped end: the domain ran (its state was restored from the
        # element) and changed since; the hook keeps it and records the store.
        for i in range(k):
            argv, env = h.hook_cmd(f"vm{i}", "prepare", "begin")
            subprocess.run(argv, env=env, input=xmls[i], check=True, capture_output=True)
            write(h.live(uuids[i]), state(2, i))
        cmds = []
        for i in range(k):
            argv, env = h.hook_cmd(f"vm{i}", "stopped", "end")
            cmds.append((argv, env, xmls[i]))
        return cmds

    single = []
    for _ in range(SINGLE_RUNS):
        single += run_at_once(prepare_round(1, True))
    storm, walls = [], []
    for _ in range(ROUNDS):
        cmds = prepare_round(N, True)
        t = time.monotonic()
        storm += run_at_once(cmds)
        walls.append(time.monotonic() - t)
    # Check the last round's work: every domain has its state (A) or its
    # pending record (B).
    for i, u in enumerate(uuids):
        if op == "prepare":
            assert open(h.live(u), "rb").read() == state(1, i), f"{u}: not restored"
        else:
            assert os.path.exists(os.path.join(h.root, f"var/lib/virt-tpm-state/pending/{u}")), u
    return summary(single, storm, walls)


def gc_row(base):
    """Row D: one stopped end with DATA_DOMAINS other domains' data."""
    h = Host(base, 'store_after_stop = true\nhelper_path = "/bin/true"\nallow_plaintext = true\n')
    u = str(uuidlib.uuid4())
    xml = packed_xml(base, "vm", u, state(1, 0)).encode()

    def populate(count):
        h.reset()
        data = os.path.join(h.root, "var/lib/virt-tpm-state")
        for i in range(count):
            o = str(uuidlib.uuid4())
            write(os.path.join(data, f"kept/{o}/tpm2/tpm2-00.permall"), state(3, i))
            for b in range(BACKUPS):
                write(os.path.join(data, f"backups/{o}/2026{b:02}-x-tpm2/tpm2-00.permall"), state(4, i))
            write(os.path.join(data, f"synced/{o}"), "0" * 64 + "\n")
        for d, _, _ in os.walk(data):
            os.chmod(d, 0o700)
        # Known to "libvirt" (a definition names them): enforce never removes them.
        for i, o in enumerate(os.listdir(os.path.join(data, "kept")) if count else []):
            write(os.path.join(h.root, f"etc/libvirt/qemu/d{i}.xml"), f"<domain><uuid>{o}</uuid></domain>", 0o644)

    rows = {}
    hint = os.path.join(h.root, "run/virt-tpm-state/gc-usage")
    for count, scan in [(0, True), (DATA_DOMAINS, True), (DATA_DOMAINS, False)]:
        populate(count)
        os.sync()
        times = []
        for r in range(SINGLE_RUNS):
            if scan and os.path.exists(hint):
                os.unlink(hint)  # as before the hint: every writer scans
            argv, env = h.hook_cmd("vm", "prepare", "begin")
            shutil.rmtree(os.path.join(h.root, f"var/lib/libvirt/swtpm/{u}"), ignore_errors=True)
            subprocess.run(argv, env=env, input=xml, check=True, capture_output=True)
            write(h.live(u), state(5, r))
            argv, env = h.hook_cmd("vm", "stopped", "end")
            t = time.monotonic()
            p = subprocess.run(argv, env=env, input=xml, capture_output=True)
            times.append(time.monotonic() - t)
            assert p.returncode == 0, p.stderr
        rows[(count, scan)] = statistics.median(times)
    return rows


def world_stores(base):
    """Row E: N concurrent `store --after-stop` through a private libvirtd."""
    world = os.path.join(base, "world")
    ws = os.path.join(REPO, "tests/e2e/world.sh")
    subprocess.run([ws, "down", world], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    subprocess.run([ws, "up", world], check=True, capture_output=True)
    try:
        root = os.path.join(world, "root")

        def wexec(args, **kw):
            return subprocess.run([ws, "exec", world] + args, capture_output=True, **kw)

        cfg = os.path.join(root, "etc/virt-tpm-state/config.toml")
        old = open(cfg).read() if os.path.exists(cfg) else ""
        lines = [l for l in old.splitlines()
                 if not l.startswith(("helper_path", "store_after_stop"))]
        write(cfg, "\n".join(lines) + '\nstore_after_stop = true\nhelper_path = "/bin/true"\n', 0o644)
        wexec([VTS, "keygen"], check=True)
        uuids = [str(uuidlib.uuid4()) for _ in range(N)]
        for i, u in enumerate(uuids):
            x = os.path.join(world, f"vm{i}.xml")
            write(x, domain_xml(f"vm{i}", u), 0o644)
            wexec(["virsh", "define", x], check=True)

        def stop(i, n):
            """The VM ran with a new state and stopped: the hook kept it and
            recorded the pending store."""
            u = uuids[i]
            libvirt_state(root, u, state(6, n * 1000 + i))
            wexec([HOOK, f"vm{i}", "stopped", "end", "-"], check=True,
                  input=domain_xml(f"vm{i}", u).encode())

        def round_(k, n):
            for i in range(k):
                stop(i, n)
            return run_at_once([([ws, "exec", world, VTS, "store", "--after-stop", uuids[i]],
                                 None, b"") for i in range(k)])

        single = []
        for n in range(SINGLE_RUNS):
            single += round_(1, n)
        storm, walls = [], []
        for n in range(ROUNDS):
            t = time.monotonic()
            storm += round_(N, 100 + n)
            walls.append(time.monotonic() - t)
        left = os.listdir(os.path.join(root, "var/lib/virt-tpm-state/pending"))
        assert not left, f"pending records left: {left}"
        # The floor: `world.sh exec` of /bin/true (namespace entry), alone.
        floor = statistics.median(run_at_once([([ws, "exec", world, "/bin/true"], None, b"")])[0][0]
                                  for _ in range(10))
        return summary(single, storm, walls), floor
    finally:
        subprocess.run([ws, "down", world], capture_output=True)


def table_row(name, s):
    return (f"| {name} | {ms(s['single'])} | {ms(s['median'])} | {ms(s['p95'])} | {ms(s['max'])} "
            f"| {s['wall']:.2f} s | {ms(s['amortised'])} | **{s['amortised_ratio']:.2f}x** "
            f"| {s['ratio']:.2f}x | {s['fails']} ({s['lock_timeouts']}) |")


def print_gc(d):
    per_k = (d[(DATA_DOMAINS, True)] - d[(0, True)]) / max(DATA_DOMAINS, 1) * 1000
    print(f"- gc::enforce: one `stopped end` that writes a new kept copy, median of {SINGLE_RUNS}: "
          f"{ms(d[(0, True)])} with an empty data dir; with {DATA_DOMAINS} other domains' data "
          f"(kept copy, {BACKUPS} backups, J each) {ms(d[(DATA_DOMAINS, True)])} when it scans the data dir "
          f"(every time, before this change: {ms(per_k)} per 1000 domains), "
          f"{ms(d[(DATA_DOMAINS, False)])} with the scan hint (`gc::SCAN_FRESH`).")


def main():
    if os.geteuid() != 0:
        sys.exit("storms.py: run as root")
    os.makedirs(OUT, exist_ok=True)
    rows = []
    if os.environ.get("ONLY") == "D":
        d = gc_row(os.path.join(OUT, "gc"))
        print_gc(d)
        return
    log(f"A: {N} prepares at once, on disk")
    a = hook_storm(os.path.join(OUT, "disk-prepare"), "prepare")
    log(f"B: {N} stopped-end hooks at once, on disk")
    b = hook_storm(os.path.join(OUT, "disk-stopped"), "stopped")
    shm = f"/dev/shm/vts-bench-storms-{os.getpid()}"
    try:
        log("C: the same on a tmpfs")
        ca = hook_storm(os.path.join(shm, "prepare"), "prepare")
        cb = hook_storm(os.path.join(shm, "stopped"), "stopped")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    log(f"D: gc::enforce with {DATA_DOMAINS} domains' data")
    d = gc_row(os.path.join(OUT, "gc"))
    log(f"E: {N} store --after-stop at once through libvirtd")
    e, floor = world_stores(os.path.join(OUT, "stores"))
    rows += [table_row(f"A. `prepare begin` restoring (disk)", a),
             table_row(f"B. `stopped end` keeping + pending record (disk)", b),
             table_row(f"C. `prepare begin` restoring (tmpfs)", ca),
             table_row(f"C. `stopped end` keeping + pending record (tmpfs)", cb),
             table_row(f"E. `store --after-stop` through libvirtd", e)]
    print(f"N = {N} at once, {ROUNDS} storm rounds; single: {SINGLE_RUNS} runs alone\n")
    print("| storm | single (median) | per-VM latency median | p95 | max | wall of the storm (median) "
          "| per-VM cost = wall / N | cost ratio: (wall / N) / single | latency ratio: median / single "
          "| failures (lock timeouts) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(f"- fsync and the disk: a `prepare` alone {ms(a['single'])} on disk vs {ms(ca['single'])} on tmpfs; "
          f"in the storm, per-VM median {ms(a['median'])} vs {ms(ca['median'])}; "
          f"`stopped end` alone {ms(b['single'])} vs {ms(cb['single'])}, storm {ms(b['median'])} vs {ms(cb['median'])}.")
    print_gc(d)
    print(f"- row E includes entering the world (`world.sh exec` of /bin/true alone: {ms(floor)}).")


if __name__ == "__main__":
    main()
