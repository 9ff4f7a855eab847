#!/bin/bash
# benches/run.sh - the benchmarks of issue 8 (docs/BENCHMARKS.md), as root:
#
#   sudo benches/run.sh            # prints the machine and the table in Markdown on stdout
#
# Every ratio is a ratio of two medians measured in the same hyperfine invocation (the product
# and its baseline back to back, each with its own warm-up), so a noisy, shared machine moves
# both sides alike. Raw hyperfine JSON, the inputs and the
# scratch trees are kept in $BENCH_DIR (default: target/bench, on the repository's disk, so the
# hook's fsyncs hit a real disk; never a tmpfs). Benchmarks are not part of the test suite: a
# regression shows in the table, it fails nothing.
#
# Environment: BENCH_DIR, RUNS (default 100: rows 1 and 2), STORE_RUNS (default 40: row 3),
# RSS_RUNS (default 9: row 5). Needs: hyperfine, /usr/bin/time (Debian package `time`), xz,
# python3, and for row 3 what tests/e2e/world.sh needs (libvirt, swtpm).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

[[ $(id -u) -eq 0 ]] || { echo "run.sh: run as root (the hook chowns to tss; row 3 runs a private libvirtd)" >&2; exit 1; }
for t in hyperfine /usr/bin/time xz python3 base64 tar; do
    command -v "$t" >/dev/null || { echo "run.sh: missing $t" >&2; exit 1; }
done

RUNS=${RUNS:-100}
STORE_RUNS=${STORE_RUNS:-40}
RSS_RUNS=${RSS_RUNS:-9}
out=${BENCH_DIR:-$repo/target/bench}
[[ $out == /* ]] || out=$repo/$out
world=$out/world
log() { echo "run.sh: $*" >&2; }

tests/e2e/world.sh down "$world" >/dev/null 2>&1 || true
rm -rf "$out"
mkdir -p "$out/json" "$out/in"
trap 'tests/e2e/world.sh down "$world" >/dev/null 2>&1 || true' EXIT

log "building release binaries (scripts/build-release.sh: the hook static, as shipped)"
cargo build --release --locked --quiet -p tools --bin bench-input
mapfile -t built < <(scripts/build-release.sh)
cli=${built[0]}
hook=${built[1]}
input=$repo/target/release/bench-input

# ------------------------------------------------------------------ inputs
in=$out/in
template=$repo/benches/data/domain.xml            # `virsh dumpxml` of a TPM 2.0 domain
typical=$repo/benches/data/tpm2-00.permall        # a real permall (see benches/data/README.md)
uuid=$(sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' "$template")
large=$in/large.permall
"$input" synth-permall 262144 "$large"
"$input" domain "$template" "$typical" >"$in/typical.xml"
"$input" domain "$template" "$large" >"$in/large.xml"
vars=/usr/share/OVMF/OVMF_VARS_4M.fd               # a real 540 KiB OVMF variable store
"$input" domain-vars "$template" "$large" "$vars" >"$in/large-vars.xml"
vm_name=$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$template" | head -1)
"$input" domain "$template" "$large" 3145728 >"$in/large-padded.xml"
cp "$template" "$in/nostate.xml"                  # the same domain, no metadata at all
"$input" element "$template" "$typical" >"$in/element.xml"

# The hook's scratch host: VIRT_TPM_STATE_ROOT, no config file, no qemu.conf (defaults: tss).
root=$out/root
mkdir -p "$root"
reset="rm -rf $root/var/lib/libvirt/swtpm $root/var/lib/virt-tpm-state $root/run/virt-tpm-state"

# What users would otherwise run as a hook: a shell script that only reads its stdin.
shell_hook=$out/shell-hook
printf '#!/bin/sh\ncat >/dev/null\n' >"$shell_hook"
chmod 0755 "$shell_hook"

# ------------------------------------------------------------------ row 3 (a private libvirt world)
log "row 3: store vs one virsh metadata --set, in a private libvirt world"
tests/e2e/world.sh up "$world" >/dev/null 2>&1
in_world() { tests/e2e/world.sh exec "$world" "$@"; }
wroot=$world/root
in_world virsh -q define "$template" >/dev/null
# The domain's state: the same permall, where libvirt keeps it (as after a start and destroy).
install -d -m 0711 "$wroot/var/lib/libvirt/swtpm" "$wroot/var/lib/libvirt/swtpm/$uuid"
install -d -m 0700 -o tss -g tss "$wroot/var/lib/libvirt/swtpm/$uuid/tpm2"
install -m 0600 -o tss -g tss "$typical" "$wroot/var/lib/libvirt/swtpm/$uuid/tpm2/tpm2-00.permall"
conf=/etc/libvirt/qemu/bench-vm.xml
remove="virsh -q metadata bench-vm urn:virt-tpm-state:1 --remove --config"
# store's default: an envelope-encrypted element sealed with a host key (`install` creates one).
# A CLI without keys (format 1 plaintext only) skips this.
if "$cli" --help | grep -q keygen; then
    in_world "$cli" keygen >&2
fi
# One store by hand: it must say "stored" and change the config file.
before=$(in_world stat -c '%i %Y.%y' "$conf")
in_world "$cli" store bench-vm | grep -q 'stored generation' || { log "store did not store"; exit 1; }
[[ $(in_world stat -c '%i %Y.%y' "$conf") != "$before" ]] || { log "store did not write $conf"; exit 1; }
# The floor sets the very element store wrote (as libvirt returns it: no prefix, no xmlns).
in_world virsh metadata bench-vm urn:virt-tpm-state:1 --config >"$in/stored-element.xml"
element=$(<"$in/stored-element.xml")
[[ $element != *"'"* ]] || { log "element has a single quote"; exit 1; }
# The same domain with that element, for the hook (row 2, "as stored"), and the host's keys.
in_world virsh dumpxml --inactive bench-vm >"$in/typical-stored.xml"
if [[ -d $wroot/etc/virt-tpm-state/keys ]]; then
    mkdir -p "$root/etc/virt-tpm-state"
    cp -a "$wroot/etc/virt-tpm-state/keys" "$root/etc/virt-tpm-state/"
fi
in_world hyperfine -N --style none --export-json "$out/json/row3-store.json" --warmup 3 --runs "$STORE_RUNS" \
    --prepare "$remove" \
    -n "store (writes)" "$cli store bench-vm" \
    -n "virsh metadata --set --config" \
    "virsh -q metadata bench-vm --uri urn:virt-tpm-state:1 --key vts --set '$element' --config" >&2
# unchanged: the metadata holds the state; store must not write the config at all.
in_world "$cli" store bench-vm >/dev/null
in_world hyperfine -N --style none --export-json "$out/json/row3-unchanged.json" --warmup 3 --runs "$STORE_RUNS" \
    -n "store (unchanged)" "$cli store bench-vm" \
    -n "virsh metadata --set --config" \
    "virsh -q metadata bench-vm --uri urn:virt-tpm-state:1 --key vts --set '$element' --config" >&2
# (The floor's element holds the same permall, so the same digest: store stays "unchanged".)
# The floor above rewrites the config each run; check "no write" on its own:
in_world "$cli" store bench-vm >/dev/null
before=$(in_world stat -c '%i %Y.%y %s' "$conf")
for _ in 1 2 3 4 5 6 7 8 9 10; do
    in_world "$cli" store bench-vm | grep -q unchanged || { log "store did not say unchanged"; exit 1; }
done
after=$(in_world stat -c '%i %Y.%y %s' "$conf")
echo "{\"before\": \"$before\", \"after\": \"$after\"}" >"$out/json/row3-nowrite.json"
tests/e2e/world.sh down "$world" >/dev/null 2>&1 || true

# ------------------------------------------------------------------ rows 1 and 2
export VIRT_TPM_STATE_ROOT=$root   # the hook works in the scratch host from here on
# hyperfine 1.15 has no --input, and its shell-spawn correction is noisier than these sub-ms
# commands. So: no shell of hyperfine's (-N); each command is `sh -c 'exec PROG ARGS < FILE'`
# (the shell opens the file and execs PROG), and `sh -c :` runs in the same invocation as the
# wrapper's floor. report.py gives the ratio of medians with that floor subtracted from both
# sides (PROG's exec + run), and the raw one (wrapper included, which flatters the product).
hf() { # NAME, then hyperfine args
    local name=$1
    shift
    hyperfine -N --style none --export-json "$out/json/$name.json" "$@" \
        -n "sh -c : (wrapper floor)" "sh -c :" >&2
}

log "row 1: ops with nothing to do vs /bin/true"
for op in "start begin" "started begin" "release end"; do
    name=row1-${op%% *}
    hf "$name" --warmup 10 --runs "$RUNS" \
        -n "hook $op" "sh -c 'exec $hook bench-vm $op - < $in/nostate.xml'" \
        -n "/bin/true" "sh -c 'exec /bin/true bench-vm $op - < $in/nostate.xml'"
done
hf row1-release-withstate --warmup 10 --runs "$RUNS" \
    -n "hook release end (9 KiB state in metadata)" "sh -c 'exec $hook bench-vm release end - < $in/typical.xml'" \
    -n "/bin/true" "sh -c 'exec /bin/true bench-vm release end - < $in/typical.xml'"

# Diagnosis for row 1: where a do-nothing Rust process stands against /bin/true. An empty
# `fn main() {}` built by the same rustc (-O), dynamically linked (as the hook is: libc +
# libgcc_s) and statically (+crt-static).
diag=$out/diag
mkdir -p "$diag"
echo 'fn main() {}' >"$diag/empty.rs"
rustc -O "$diag/empty.rs" -o "$diag/empty-rust-dynamic"
rustc -O -C target-feature=+crt-static "$diag/empty.rs" -o "$diag/empty-rust-static"
hf row1-diag --warmup 10 --runs "$RUNS" \
    -n "hook start" "sh -c 'exec $hook bench-vm start begin - < $in/nostate.xml'" \
    -n "/bin/true" "sh -c 'exec /bin/true < $in/nostate.xml'" \
    -n "empty Rust main, dynamic" "sh -c 'exec $diag/empty-rust-dynamic < $in/nostate.xml'" \
    -n "empty Rust main, static" "sh -c 'exec $diag/empty-rust-static < $in/nostate.xml'"

log "row 2: prepare restoring a state (each run restores: --prepare resets the scratch tree)"
reset_vars="$reset $root/var/lib/libvirt/qemu/nvram"
for size in typical typical-stored large large-vars; do
    # check once that it really restores
    $reset_vars
    "$hook" bench-vm prepare begin - <"$in/$size.xml"
    cmp "$root/var/lib/libvirt/swtpm/$uuid/tpm2/tpm2-00.permall" \
        "$([[ $size == large* ]] && echo "$large" || echo "$typical")"
    if [[ $size == large-vars ]]; then
        cmp "$root/var/lib/libvirt/qemu/nvram/${vm_name}_VARS.fd" "$vars"
    fi
    hf "row2-$size" --warmup 5 --runs "$RUNS" --prepare "$reset_vars" \
        -n "hook prepare ($size)" "sh -c 'exec $hook bench-vm prepare begin - < $in/$size.xml'" \
        -n "shell hook" "sh -c 'exec $shell_hook bench-vm prepare begin - < $in/$size.xml'"
done

# ------------------------------------------------------------------ row 4 (sizes)
log "row 4: encoded sizes"
sizes() { # NAME PERMALL XML
    local name=$1 permall=$2 xml=$3 d ours ovirt floor element
    d=$(mktemp -d "$out/state.XXXXXX")
    cp "$permall" "$d/tpm2-00.permall"
    ours=$(sed -n 's:.*<\(vts\:\)\?file [^>]*>\([^<]*\)<.*:\2:p' "$xml" | tr -d ' \n' | wc -c)
    ovirt=$(tar --create --xz --sort=name --directory "$d" . | base64 -w0 | wc -c)
    floor=$(xz -9 -c "$permall" | base64 -w0 | wc -c)
    element=$(sed -n '/<\(vts:\)\?state /,/<\/\(vts:\)\?state>/p' "$xml" | sed 's/^ *//' | wc -c)
    echo "{\"raw\": $(stat -c %s "$permall"), \"ours\": $ours, \"element\": $element, \"ovirt\": $ovirt, \"floor\": $floor}" \
        >"$out/json/row4-$name.json"
    rm -rf "$d"
}
sizes typical "$typical" "$in/typical.xml"
sizes large "$large" "$in/large.xml"
[[ -s $in/stored-element.xml ]] && sizes typical-stored "$typical" "$in/stored-element.xml"

# ------------------------------------------------------------------ row 5 (peak RSS)
log "row 5: peak RSS (/usr/bin/time -v), median of $RSS_RUNS"
rss() { # NAME CMD... (stdin from $RSS_IN)
    local name=$1 i vals=()
    shift
    for ((i = 0; i < RSS_RUNS; i++)); do
        $reset
        /usr/bin/time -f '%M' -o "$out/rss.tmp" "$@" <"$RSS_IN" >/dev/null
        vals+=("$(<"$out/rss.tmp")")
    done
    echo "{\"kib\": [$(IFS=,; echo "${vals[*]}")], \"xml_bytes\": $(stat -c %s "$RSS_IN")}" >"$out/json/row5-$name.json"
}
RSS_IN=$in/large.xml rss large "$hook" bench-vm prepare begin -
RSS_IN=$in/large-padded.xml rss large-padded "$hook" bench-vm prepare begin -
RSS_IN=$in/typical.xml rss typical "$hook" bench-vm prepare begin -
RSS_IN=$in/nostate.xml rss true /bin/true
RSS_IN=$in/large.xml rss shell "$shell_hook" bench-vm prepare begin -

# ------------------------------------------------------------------ the report
python3 "$repo/benches/report.py" "$out" "$root"
