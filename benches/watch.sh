#!/bin/bash
# benches/watch.sh - the watch daemon's benchmark (issue 5), as root:
#
#   sudo benches/watch.sh          # prints a Markdown section on stdout
#
# In a private libvirt world (tests/e2e/world.sh) it defines VMS domains (128 MiB, no disk, an
# emulated TPM 2.0, KVM when /dev/kvm exists), lets libvirt manufacture each TPM, starts RUNNING
# of them (paused: swtpm and QEMU run, the guest CPU does not, so no TPM command of the guest
# changes the state during the idle window) and runs the release `virt-tpm-state watch`. Then:
#   1. latency: LAT_RUNS times, a change that looks like swtpm's (new file + rename) in one
#      running VM's state dir, and the time until both the live status XML
#      (/run/libvirt/qemu/NAME.xml) and the persistent config (/etc/libvirt/qemu/NAME.xml)
#      carry the new digest (polled every 10 ms from the files, not through libvirt);
#   2. idle: the daemon's user+system CPU time (/proc/PID/stat) over IDLE_SECS of nothing, and
#      whether any domain XML file was rewritten meanwhile (mtimes) or any store was logged.
# Not part of the test suite: numbers to read, not a pass/fail.
#
# Environment: VMS (default 30), RUNNING (default 20), LAT_RUNS (default 20), IDLE_SECS
# (default 600), BENCH_DIR (default target/bench-watch).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
[[ $(id -u) -eq 0 ]] || { echo "watch.sh: run as root (it runs a private libvirtd)" >&2; exit 1; }

VMS=${VMS:-30}
RUNNING=${RUNNING:-20}
LAT_RUNS=${LAT_RUNS:-20}
IDLE_SECS=${IDLE_SECS:-600}
out=${BENCH_DIR:-$repo/target/bench-watch}
[[ $out == /* ]] || out=$repo/$out
world=$out/world
log() { echo "watch.sh: $*" >&2; }
ws() { tests/e2e/world.sh "$@"; }

ws down "$world" >/dev/null 2>&1 || true
rm -rf "$out"
mkdir -p "$out"
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
    ws down "$world" >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "building the release binaries"
cargo build --release --locked --quiet -p virt-tpm-state --bins
scripts/build-hook.sh --release --quiet   # `install` takes the hook beside the CLI
cli=$repo/target/release/virt-tpm-state

ws up "$world" 2>/dev/null
ws exec "$world" "$cli" install >/dev/null
kind=qemu
[[ -e /dev/kvm ]] && kind=kvm
log "defining $VMS domains, manufacturing their TPMs, starting $RUNNING (paused)"
for i in $(seq 1 "$VMS"); do
    name=$(printf 'bench%02d' "$i")
    uuid=$(cat /proc/sys/kernel/random/uuid)
    echo "$name $uuid" >>"$out/domains"
    cat >"$out/$name.xml" <<EOF
<domain type='$kind'><name>$name</name><uuid>$uuid</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>
EOF
    ws exec "$world" virsh -q define "$out/$name.xml" >/dev/null
    ws exec "$world" virsh -q start "$name" >/dev/null
    ws exec "$world" virsh -q destroy "$name" >/dev/null
    if ((i <= RUNNING)); then
        ws exec "$world" virsh -q start --paused "$name" >/dev/null
    fi
done
# Let the post-stop stores of the manufacturing stops finish.
sleep 5

log "starting the daemon"
# world.sh execs nsenter, which execs env, which execs the CLI: $! is the daemon itself.
tests/e2e/world.sh exec "$world" "$cli" -v watch 2>"$out/watch.log" &
daemon=$!
python3 - "$world/root" "$out" "$daemon" "$RUNNING" "$LAT_RUNS" "$IDLE_SECS" <<'PY'
import hashlib, os, re, statistics, sys, time
root, out, pid, running, lat_runs, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
doms = [l.split() for l in open(os.path.join(out, "domains"))]
run = doms[:running]
tick = os.sysconf("SC_CLK_TCK")

def cpu():
    f = open(f"/proc/{pid}/stat").read()
    f = f[f.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / tick

def digest(data):
    line = f"tpm/tpm2-00.permall {hashlib.sha256(data).hexdigest()}\n"
    return hashlib.sha256(line.encode()).hexdigest()

def files(name):
    return [os.path.join(root, "run/libvirt/qemu", name + ".xml"), os.path.join(root, "etc/libvirt/qemu", name + ".xml")]

def holds(name, d):
    for f in files(name):
        try:
            if f'digest="{d}"' not in open(f).read():
                return False
        except FileNotFoundError:
            return False
    return True

def permall(uuid):
    return os.path.join(root, "var/lib/libvirt/swtpm", uuid, "tpm2", "tpm2-00.permall")

# Wait for the start-up reconcile to bring every running VM in sync.
t0 = time.monotonic()
while not all(holds(n, digest(open(permall(u), "rb").read())) for n, u in run):
    if time.monotonic() - t0 > 300:
        sys.exit("watch.sh: the daemon did not sync the running VMs within 300 s")
    time.sleep(0.2)
startup = time.monotonic() - t0
startup_cpu = cpu()
time.sleep(3)

lat = []
for i in range(lat_runs):
    name, uuid = run[i % len(run)]
    p = permall(uuid)
    data = bytearray(open(p, "rb").read())
    data[-8:] = (0xB000 + i).to_bytes(8, "big")
    d = digest(bytes(data))
    tmp = os.path.join(os.path.dirname(p), "TMP2-00.permall")
    with open(tmp, "wb") as f:
        f.write(data)
    t = time.monotonic()
    os.rename(tmp, p)
    while not holds(name, d):
        if time.monotonic() - t > 60:
            sys.exit(f"watch.sh: change {i} not in the metadata after 60 s")
        time.sleep(0.01)
    lat.append(time.monotonic() - t)
    time.sleep(0.5)
time.sleep(3)

all_files = [f for n, _ in doms for f in files(n) if os.path.exists(f)]
mt = {f: os.stat(f).st_mtime_ns for f in all_files}
log = os.path.join(out, "watch.log")
stores0 = open(log).read().count("stored generation")
c0, w0 = cpu(), time.monotonic()
time.sleep(idle)
c1, w1 = cpu(), time.monotonic()
changed = [f for f in all_files if os.stat(f).st_mtime_ns != mt[f]]
stores1 = open(log).read().count("stored generation")
rss = [l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0]

lat.sort()
q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat
print(f"- domains: {len(doms)} defined, {running} running (paused), 128 MiB, no disk, TPM 2.0; settle_interval_ms 1000 (default), reconcile_interval_secs 300 (default)")
print(f"- start-up: all {running} running VMs synced {startup:.1f} s after the daemon started (CPU {startup_cpu:.2f} s)")
print(f"- change -> live and config metadata, {len(lat)} changes: median {statistics.median(lat):.2f} s, min {lat[0]:.2f} s, p95 {q[-1]:.2f} s, max {lat[-1]:.2f} s")
print(f"- idle {w1 - w0:.0f} s: daemon CPU {c1 - c0:.2f} s ({100 * (c1 - c0) / (w1 - w0):.4f} % of one core), domain XML files rewritten: {len(changed)}, stores logged: {stores1 - stores0}, RSS {rss} kB")
PY
