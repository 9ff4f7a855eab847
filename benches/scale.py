#!/usr/bin/env python3
"""benches/scale.py - the host at scale (issue 22), as root:

    sudo benches/scale.py             # prints a Markdown section on stdout

One private libvirt world (tests/e2e/world.sh) grown to each size in SIZES
(default 20,100,500 defined domains: 128 MiB, no disk, an emulated TPM 2.0,
each with a sealed state element made by `pack --key` and a local state dir
holding that state, as a VM that ran here before); RUNNING of them run
(paused: swtpm and QEMU run, the guest CPU does not; default 10 at 20 domains,
20 above: the 2-core machine's comfortable limit). The hook is installed (it
restores each running VM's state at start). At each size, with the release
build (scripts/build-release.sh):

  - `status` and `status --json`: wall time, median of STATUS_RUNS (5), minus
    the cost of entering the world (`world.sh exec /bin/true`);
  - one reconcile: `virt-tpm-state watch` with reconcile_interval_secs =
    RECONCILE_SECS (5), CPU time of the daemon and of libvirtd over
    RECONCILES (6) reconciles, per reconcile (from /proc/PID/stat);
  - the daemon's RSS after that (VmRSS);
  - CPU per event: EVENTS (10) changes that look like swtpm's (a new permall
    renamed over the old one) in running VMs, each waited for until the
    config XML file carries the new digest; daemon and libvirtd CPU per event;
  - idle: at the largest size, the daemon with the default
    reconcile_interval_secs (300) for IDLE_SECS (60) of nothing: its CPU time.

Cost per domain = the measure divided by the number of defined domains.
"""

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from storms import HOOK, PERMALL, REPO, VTS, libvirt_state, log, packed_xml, state, write  # noqa: E402

SIZES = [int(x) for x in os.environ.get("SIZES", "20,100,500").split(",")]
STATUS_RUNS = int(os.environ.get("STATUS_RUNS", "5"))
RECONCILE_SECS = int(os.environ.get("RECONCILE_SECS", "5"))
RECONCILES = int(os.environ.get("RECONCILES", "6"))
EVENTS = int(os.environ.get("EVENTS", "10"))
IDLE_SECS = int(os.environ.get("IDLE_SECS", "60"))
OUT = os.path.abspath(os.environ.get("BENCH_DIR", os.path.join(REPO, "target/bench-scale")))
WS = os.path.join(REPO, "tests/e2e/world.sh")
WORLD = os.path.join(OUT, "world")
ROOT = os.path.join(WORLD, "root")
TICK = os.sysconf("SC_CLK_TCK")


def running_for(size):
    return int(os.environ.get("RUNNING", "0")) or (10 if size <= 20 else 20)


def wexec(args, check=False, **kw):
    p = subprocess.run([WS, "exec", WORLD] + args, capture_output=True, **kw)
    if check and p.returncode != 0:
        raise SystemExit(f"{args}: exit {p.returncode}\n{p.stdout.decode()}\n{p.stderr.decode()}")
    return p


def cpu(pid):
    stat = open(f"/proc/{pid}/stat").read()
    f = stat[stat.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TICK


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def digest(permall):
    line = f"tpm/tpm2-00.permall {hashlib.sha256(permall).hexdigest()}\n"
    return hashlib.sha256(line.encode()).hexdigest()


def timed(args, runs):
    ts = []
    for _ in range(runs):
        t = time.monotonic()
        p = wexec(args)
        ts.append(time.monotonic() - t)
        if p.returncode not in (0, 20):
            raise SystemExit(f"{args}: exit {p.returncode}: {p.stderr.decode()[:300]}")
    return statistics.median(ts)


def set_config(extra):
    cfg = os.path.join(ROOT, "etc/virt-tpm-state/config.toml")
    old = open(cfg).read() if os.path.exists(cfg) else ""
    keep = [l for l in old.splitlines()
            if not l.startswith(("reconcile_interval_secs", "settle_interval_ms"))]
    write(cfg, "\n".join(keep) + "\n" + extra, 0o644)


class Daemon:
    def __init__(self, tag):
        self.log = os.path.join(OUT, f"watch-{tag}.log")
        self.p = subprocess.Popen([WS, "exec", WORLD, VTS, "-v", "watch"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=open(self.log, "w"))
        t = time.monotonic()
        while "watching" not in open(self.log).read():
            if time.monotonic() - t > 30:
                raise SystemExit(f"the daemon did not start: {open(self.log).read()}")
            time.sleep(0.05)

    def stop(self):
        self.p.terminate()
        self.p.wait()


def main():
    if os.geteuid() != 0:
        sys.exit("scale.py: run as root")
    subprocess.run([WS, "down", WORLD], capture_output=True)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    subprocess.run([WS, "up", WORLD], check=True, capture_output=True)
    libvirtd = open(os.path.join(WORLD, "libvirtd.pid")).read().strip()
    rows, idle = [], None
    try:
        out = wexec([VTS, "install", "--no-watch", "--hook", HOOK], check=True)
        log(out.stdout.decode().strip().splitlines()[-1])
        key = sorted(os.listdir(os.path.join(ROOT, "etc/virt-tpm-state/keys")))[0]
        key_id = key[:-len(".key")].rsplit("-", 1)[1]
        keys_dir = os.path.join(ROOT, "etc/virt-tpm-state/keys")
        floor = timed(["/bin/true"], 10)
        vms, running, n_event = [], [], 0
        for size in SIZES:
            log(f"growing to {size} defined domains")
            batch = []
            while len(vms) < size:
                i = len(vms)
                u, name = str(uuidlib.uuid4()), f"s{len(vms):04d}"
                # The real permall as it is: a running VM's swtpm must accept
                # it (a changed byte breaks its integrity check).
                st = PERMALL
                xml = packed_xml(OUT, name, u, st, seal=("--key", key_id, "--keys", keys_dir))
                path = os.path.join(WORLD, f"{name}.xml")
                write(path, xml, 0o644)
                libvirt_state(ROOT, u, st)
                vms.append((name, u))
                batch.append(path)
            # One virsh session per 50 definitions.
            for k in range(0, len(batch), 50):
                wexec(["virsh", "-q", ";".join(f"define {p}" for p in batch[k:k + 50])], check=True)
            want = running_for(size)
            while len(running) < want:
                name, u = vms[len(running)]
                wexec(["virsh", "start", "--paused", name], check=True)
                running.append((name, u))
            log(f"{size} defined, {len(running)} running: status")
            st_h = timed([VTS, "status"], STATUS_RUNS) - floor
            st_j = timed([VTS, "status", "--json"], STATUS_RUNS) - floor

            log("reconciles")
            set_config(f"reconcile_interval_secs = {RECONCILE_SECS}\nsettle_interval_ms = 1000\n")
            d = Daemon(f"{size}")
            time.sleep(RECONCILE_SECS / 2)
            c0, l0 = cpu(d.p.pid), cpu(libvirtd)
            time.sleep(RECONCILE_SECS * RECONCILES)
            rec_d = (cpu(d.p.pid) - c0) / RECONCILES
            rec_l = (cpu(libvirtd) - l0) / RECONCILES
            rss = rss_kb(d.p.pid)
            d.stop()

            log("events")
            set_config("reconcile_interval_secs = 300\nsettle_interval_ms = 1000\n")
            d = Daemon(f"{size}-events")
            time.sleep(3)
            c0, l0 = cpu(d.p.pid), cpu(libvirtd)
            lat = []
            for e in range(EVENTS):
                name, u = running[e % len(running)]
                live = os.path.join(ROOT, f"var/lib/libvirt/swtpm/{u}/tpm2/tpm2-00.permall")
                n_event += 1
                data = state(8, n_event)
                tmp = os.path.join(os.path.dirname(live), "TMP2-00.permall")
                write(tmp, data)
                st_ = os.stat(live)
                os.chown(tmp, st_.st_uid, st_.st_gid)
                t = time.monotonic()
                os.rename(tmp, live)
                want_d = digest(data)
                cfg = os.path.join(ROOT, f"etc/libvirt/qemu/{name}.xml")
                while want_d not in open(cfg).read():
                    if time.monotonic() - t > 30:
                        raise SystemExit(f"{name}: change not stored in 30 s\n{open(d.log).read()[-2000:]}")
                    time.sleep(0.01)
                lat.append(time.monotonic() - t)
            ev_d = (cpu(d.p.pid) - c0) / EVENTS
            ev_l = (cpu(libvirtd) - l0) / EVENTS
            if size == SIZES[-1]:
                log(f"idle {IDLE_SECS} s")
                c0 = cpu(d.p.pid)
                time.sleep(IDLE_SECS)
                idle = (size, len(running), cpu(d.p.pid) - c0, rss_kb(d.p.pid))
            d.stop()
            rows.append((size, len(running), st_h, st_j, rec_d, rec_l, rss, ev_d, ev_l,
                         statistics.median(lat)))
    finally:
        subprocess.run([WS, "down", WORLD], capture_output=True)

    print("| defined | running | `status` | `status --json` | per domain | one reconcile: daemon CPU | libvirtd CPU | per domain (both) | daemon RSS | CPU per event: daemon | libvirtd | change -> config (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (size, run, sh, sj, rd, rl, rss, ed, el, lat) in rows:
        print(f"| {size} | {run} | {sh * 1000:.0f} ms | {sj * 1000:.0f} ms | {sh / size * 1000:.2f} ms "
              f"| {rd * 1000:.0f} ms | {rl * 1000:.0f} ms | {(rd + rl) / size * 1000:.2f} ms "
              f"| {rss / 1024:.1f} MiB | {ed * 1000:.0f} ms | {el * 1000:.0f} ms | {lat:.2f} s |")
    if idle:
        print(f"\nIdle: {idle[0]} defined, {idle[1]} running, default reconcile_interval_secs (300): "
              f"daemon CPU {idle[2]:.2f} s in {IDLE_SECS} s, RSS {idle[3] / 1024:.1f} MiB.")
    print(f"\nCPU from /proc/PID/stat (resolution {1000 // TICK} ms); `status` minus entering the world "
          f"({floor * 1000:.0f} ms).")


if __name__ == "__main__":
    main()
