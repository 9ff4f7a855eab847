#!/bin/bash
# tpm.sh - a guest-free TPM: serve a libvirt swtpm state dir with swtpm on 127.0.0.1 and talk
# to it with tpm2-tools, to plant a secret in a TPM and check later that it is still there.
#
# Usage (STATEDIR absolute, e.g. /var/lib/libvirt/swtpm/<uuid>/tpm2; the domain must be shut off;
# STATEDIR may also be a swtpm linear state file, libvirt's <source type='file'>, served with
# --tpmstate backend-uri=file://; fingerprint then needs python3 to take permall out of it):
#   tpm.sh write-secret STATEDIR SECRET   store SECRET in NV index 0x1500016 (in place;
#                                         file ownership is restored afterwards)
#   tpm.sh read-secret STATEDIR           print the secret (no trailing newline added)
#   tpm.sh ek-pub [--tpm1] STATEDIR       sha256 hex of the endorsement key's public part
#   tpm.sh fingerprint [--tpm1] STATEDIR  sha256 hex of tpm2-00.permall (tpm-00.permall)
# Inside a world:  tests/e2e/world.sh exec WORLD tests/e2e/tpm.sh read-secret STATEDIR
#
# read-secret and ek-pub work on a temporary copy of STATEDIR, so they never change it (a TPM
# startup alone rewrites permall: reset counters). The EK is derived from the endorsement
# seed, so the same state gives the same ek-pub. TPM 1.2: only ek-pub (raw TPM_ReadPubek over
# the socket, needs python3) and fingerprint; tpm2-tools cannot talk to a 1.2 TPM.
set -euo pipefail

NV_INDEX=0x1500016
MAX_SECRET=1024
TMPD=
SWTPM_PID=
CTRL_PORT=

die() { echo "tpm.sh: $*" >&2; exit 1; }

cleanup() {
    stop_swtpm || true
    [[ -n $TMPD ]] && rm -rf "$TMPD"
    return 0
}
trap cleanup EXIT

port_busy() {
    # ss prints a header line; any further line means something listens there.
    [[ $(ss -Hltn "sport = :$1" 2>/dev/null | wc -l) -gt 0 ]]
}

# start_swtpm DIR 1.2|2.0 -> sets PORT, CTRL_PORT, SWTPM_PID, exports TPM2TOOLS_TCTI
start_swtpm() {
    local dir=$1 ver=$2 try p verflag=() pidf log
    [[ $ver == 2.0 ]] && verflag=(--tpm2)
    pidf=$TMPD/swtpm.pid
    log=$TMPD/swtpm.log
    for ((try = 0; try < 30; try++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        port_busy "$p" && continue
        port_busy "$((p + 1))" && continue
        rm -f "$pidf"
        local state="dir=$dir,mode=0600"
        [[ -f $dir ]] && state="backend-uri=file://$dir,mode=0600"
        if swtpm socket "${verflag[@]}" --tpmstate "$state" \
            --server "type=tcp,port=$p,bindaddr=127.0.0.1" \
            --ctrl "type=tcp,port=$((p + 1)),bindaddr=127.0.0.1" \
            --flags not-need-init,startup-clear --pid "file=$pidf" \
            --log "file=$log" --daemon 2>>"$log"; then
            local i
            for ((i = 0; i < 50; i++)); do
                [[ -s $pidf ]] && break
                sleep 0.05
            done
            [[ -s $pidf ]] || die "swtpm started but wrote no pid file"
            SWTPM_PID=$(<"$pidf")
            PORT=$p
            CTRL_PORT=$((p + 1))
            export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$PORT"
            # wait until both ports listen (a busy machine can take seconds)
            for ((i = 0; i < 200; i++)); do
                port_busy "$PORT" && port_busy "$CTRL_PORT" && return 0
                sleep 0.05
            done
            cat "$log" >&2 || true
            die "swtpm on $dir does not listen on ports $PORT/$CTRL_PORT after 10s"
        fi
    done
    cat "$log" >&2 || true
    die "could not start swtpm on $dir"
}

stop_swtpm() {
    [[ -n $SWTPM_PID ]] || return 0
    local pid=$SWTPM_PID i
    SWTPM_PID=
    swtpm_ioctl --tcp "127.0.0.1:$CTRL_PORT" -s >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    die "swtpm $pid did not exit"
}

# (tpm2_nvreadpublic of an undefined index segfaults in tpm2-tools 5.4: ask getcap first)
# A failing tpm2_getcap is an error, not "undefined".
nv_defined() {
    local caps
    caps=$(tpm2_getcap handles-nv-index) || die "tpm2_getcap handles-nv-index failed (TCTI $TPM2TOOLS_TCTI)"
    grep -qi "^- *${NV_INDEX}\$" <<<"$caps"
}

state_ver() { # STATEDIR [--tpm1 given] -> 2.0|1.2
    local dir=$1 tpm1=$2
    if [[ $tpm1 == 1 || (-d $dir && -e $dir/tpm-00.permall && ! -e $dir/tpm2-00.permall) ]]; then
        echo 1.2
    else
        echo 2.0
    fi
}

check_dir() {
    [[ $1 == /* ]] || die "STATEDIR must be absolute: $1"
    [[ -d $1 || -f $1 ]] || die "no such state dir or file: $1"
}

copy_aside() { # copy STATEDIR to a temp dir (a state file to a temp file), print its path
    if [[ -f $1 ]]; then
        cp "$1" "$TMPD/state.lin"
        echo "$TMPD/state.lin"
        return 0
    fi
    mkdir -p "$TMPD/state"
    cp -a "$1/." "$TMPD/state/"
    rm -f "$TMPD/state/.lock"
    echo "$TMPD/state"
}

cmd_write_secret() {
    local dir=$1 secret=$2 owner size
    check_dir "$dir"
    [[ -f $dir || -e $dir/tpm2-00.permall ]] || die "$dir holds no TPM 2.0 state (tpm2-00.permall)"
    size=${#secret}
    ((size > 0 && size <= MAX_SECRET)) || die "SECRET must be 1..$MAX_SECRET bytes"
    owner=$(stat -c %u:%g "$dir")
    start_swtpm "$dir" 2.0
    if nv_defined; then
        tpm2_nvreadpublic "$NV_INDEX" >"$TMPD/nvpub"
        if ! grep -q "size: $size\$" "$TMPD/nvpub"; then
            tpm2_nvundefine -C o "$NV_INDEX" >/dev/null
            tpm2_nvdefine -C o -s "$size" -a "ownerread|ownerwrite|authread|authwrite" "$NV_INDEX" >/dev/null
        fi
    else
        tpm2_nvdefine -C o -s "$size" -a "ownerread|ownerwrite|authread|authwrite" "$NV_INDEX" >/dev/null
    fi
    printf '%s' "$secret" >"$TMPD/secret"
    tpm2_nvwrite -C o -i "$TMPD/secret" "$NV_INDEX"
    tpm2_shutdown >/dev/null 2>&1 || true
    stop_swtpm
    chown -R "$owner" "$dir"
}

cmd_read_secret() {
    local dir=$1 copy size
    check_dir "$dir"
    copy=$(copy_aside "$dir")
    start_swtpm "$copy" 2.0
    nv_defined || die "no secret (NV index $NV_INDEX undefined)"
    tpm2_nvreadpublic "$NV_INDEX" >"$TMPD/nvpub"
    size=$(sed -n 's/^ *size: *\([0-9]*\)$/\1/p' "$TMPD/nvpub" | head -n1)
    [[ -n $size ]] || die "cannot read NV index size"
    tpm2_nvread -C o -s "$size" -o "$TMPD/out" "$NV_INDEX" >/dev/null
    stop_swtpm
    cat "$TMPD/out"
}

# TPM 1.2: TPM_ReadPubek (ordinal 0x7c) over the raw data socket; prints sha256 of the pubkey.
tpm12_readpubek() {
    python3 - "$PORT" <<'EOF'
import hashlib, os, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
cmd = struct.pack(">HII", 0x00C1, 30, 0x7C) + os.urandom(20)
s.sendall(cmd)
buf = b""
while len(buf) < 10 or len(buf) < struct.unpack(">HII", buf[:10])[1]:
    chunk = s.recv(4096)
    if not chunk:
        break
    buf += chunk
tag, size, rc = struct.unpack(">HII", buf[:10])
if rc != 0:
    sys.exit("TPM_ReadPubek failed: rc=0x%x" % rc)
pubkey = buf[10:size - 20]          # TPM_PUBKEY, then a 20-byte checksum
print(hashlib.sha256(pubkey).hexdigest())
EOF
}

cmd_ek_pub() {
    local dir=$1 ver=$2 copy
    check_dir "$dir"
    copy=$(copy_aside "$dir")
    start_swtpm "$copy" "$ver"
    if [[ $ver == 1.2 ]]; then
        tpm12_readpubek
    elif tpm2_readpublic -c 0x81010001 -o "$TMPD/ek.pub" >/dev/null 2>&1; then
        sha256sum "$TMPD/ek.pub" | cut -d' ' -f1
    else
        # No persistent EK: derive it (deterministic: same endorsement seed, same key).
        tpm2_createek -c "$TMPD/ek.ctx" -G rsa -u "$TMPD/ek.pub" >/dev/null
        sha256sum "$TMPD/ek.pub" | cut -d' ' -f1
    fi
    stop_swtpm
}

# permall (slot 0) of a swtpm linear file, raw, to stdout (layout: src/linear.rs).
linear_permall() {
    python3 - "$1" <<'EOF'
import struct, sys
d = open(sys.argv[1], "rb").read()
magic, ver, _, hdrsize = struct.unpack_from("<QBBH", d)
if magic != 0x737774706d6c696e or ver != 1:
    sys.exit("not a swtpm linear state file")
off, length, _ = struct.unpack_from("<III", d, 12)
if off == 0 or off + length > len(d):
    sys.exit("no permall in the linear state file")
sys.stdout.buffer.write(d[off:off + length])
EOF
}

cmd_fingerprint() {
    local dir=$1 ver=$2 f
    check_dir "$dir"
    if [[ -f $dir ]]; then
        linear_permall "$dir" | sha256sum | cut -d' ' -f1
        return 0
    fi
    f=$dir/tpm2-00.permall
    [[ $ver == 1.2 ]] && f=$dir/tpm-00.permall
    [[ -f $f ]] || die "no $f"
    sha256sum "$f" | cut -d' ' -f1
}

main() {
    [[ $# -ge 1 ]] || die "usage: tpm.sh write-secret|read-secret|ek-pub|fingerprint [--tpm1] STATEDIR [SECRET]"
    local cmd=$1 tpm1=0 args=() a
    shift
    for a in "$@"; do
        case $a in
            --tpm1) tpm1=1 ;;
            --tpm2) tpm1=0 ;;
            *) args+=("$a") ;;
        esac
    done
    TMPD=$(mktemp -d /tmp/tpm-sh.XXXXXX)
    case $cmd in
        write-secret)
            [[ ${#args[@]} -eq 2 ]] || die "usage: tpm.sh write-secret STATEDIR SECRET"
            [[ $tpm1 == 0 ]] || die "write-secret: TPM 1.2 is not supported"
            cmd_write_secret "${args[0]}" "${args[1]}" ;;
        read-secret)
            [[ ${#args[@]} -eq 1 ]] || die "usage: tpm.sh read-secret STATEDIR"
            [[ $tpm1 == 0 ]] || die "read-secret: TPM 1.2 is not supported"
            cmd_read_secret "${args[0]}" ;;
        ek-pub)
            [[ ${#args[@]} -eq 1 ]] || die "usage: tpm.sh ek-pub [--tpm1] STATEDIR"
            cmd_ek_pub "${args[0]}" "$(state_ver "${args[0]}" "$tpm1")" ;;
        fingerprint)
            [[ ${#args[@]} -eq 1 ]] || die "usage: tpm.sh fingerprint [--tpm1] STATEDIR"
            cmd_fingerprint "${args[0]}" "$(state_ver "${args[0]}" "$tpm1")" ;;
        *) die "unknown command: $cmd" ;;
    esac
}

main "$@"
