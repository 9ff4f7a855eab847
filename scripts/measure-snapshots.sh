#!/bin/bash
# measure-snapshots.sh - what libvirt's snapshots do to a TPM VM's state, measured in a private
# libvirt world (tests/e2e/world.sh) with virt-tpm-state's hook installed and a logging hook
# beside it. Prints one table row (markdown) per combination of:
#   snapshot kind   int-mem (internal, with memory), int-disk (internal, disk only),
#                   ext-disk (external, disk only), ext-mem (external, with memory)
#   taken           with the VM running or shut off
#   reverted from   the VM running or shut off at the time of `virsh snapshot-revert`
#   firmware        uefi (OVMF, pflash VARS) or bios
# The sequence for each row: define a fresh VM (a 32 MiB qcow2 disk, TPM 2.0), manufacture
# its TPM, plant secret S1 in NV and store (element E1); take the snapshot; then change the
# TPM (secret S2) and, on UEFI, the VARS (shim's SHIM_VERBOSE variable) while shut off and
# never store that; then revert, and start the VM once more to see which TPM and VARS it runs
# with. Recorded: libvirt's answer to create and revert, the hook calls and lifecycle events
# each one caused, whether the definition after the revert holds the snapshot's element, the
# secret and VARS of the next run, and whether our hook made a backup.
#
# Usage (root; after `cargo build && scripts/build-hook.sh`):
#   scripts/measure-snapshots.sh                 # the host's libvirt
#   VTS_WORLD_ROOTFS=/abs/root scripts/measure-snapshots.sh    # another root's libvirt
#   REVERT="virt-tpm-state snapshot revert" scripts/measure-snapshots.sh   # our revert
#   WATCH=1 scripts/measure-snapshots.sh         # with the watch daemon running
# KINDS / FIRMWARE restrict the matrix, e.g. KINDS="int-disk ext-disk" FIRMWARE=uefi; ONLY is an
# extended regex on "FW KIND TAKEN" (e.g. ONLY='^(uefi ext-|bios int-mem)').
set -uo pipefail
cd "$(dirname "$0")/.."
PROJECT=$(pwd -P)
WORLD_SH=$PROJECT/tests/e2e/world.sh
TPM_SH=$PROJECT/tests/e2e/tpm.sh
# VTS_BIN: where virt-tpm-state and virt-tpm-state-hook are (a frozen copy lets a long run
# go on while the tree is rebuilt).
BIN=${VTS_BIN:-$PROJECT/target/debug}
VTS=$BIN/virt-tpm-state
KINDS=${KINDS:-int-mem int-disk ext-disk ext-mem}
FIRMWARE=${FIRMWARE:-uefi bios}
REVERT=${REVERT:-virsh snapshot-revert}
[[ $REVERT == virt-tpm-state* ]] && REVERT="$BIN/$REVERT"
WATCH=${WATCH:-0}
[[ $(id -u) -eq 0 ]] || { echo "measure-snapshots: needs root" >&2; exit 1; }
[[ -x $VTS ]] || { echo "measure-snapshots: build first (cargo build && scripts/build-hook.sh)" >&2; exit 1; }
command -v virt-fw-vars >/dev/null || { echo "measure-snapshots: virt-fw-vars missing" >&2; exit 1; }

W=$PROJECT/target/measure-world-$$
LOG=$W/measure.log
trap '"$WORLD_SH" down "$W" >/dev/null 2>&1' EXIT
"$WORLD_SH" up "$W" >/dev/null || exit 1
mkdir -p "$W/out"
in_w() { "$WORLD_SH" exec "$W" "$@"; }
host() { echo "$W/root$1"; }
KVM=qemu; [[ -e /dev/kvm ]] && KVM=kvm

# The logging hook runs before ours (qemu.d is sorted by name) and records every call.
HOOKLOG=/var/log/libvirt/vts-hook-calls.log
mkdir -p "$(host /etc/libvirt/hooks/qemu.d)"
cat >"$(host /etc/libvirt/hooks/qemu.d/00-log)" <<EOF
#!/bin/sh
d=\$(grep -o '<vts:state [^>]*' | grep -o ' digest="[0-9a-f]\{8\}' | head -n1 | cut -d'"' -f2)
echo "\$2/\$3 \$4 \${d:--}" >>$HOOKLOG
EOF
chmod 755 "$(host /etc/libvirt/hooks/qemu.d/00-log)"
in_w "$VTS" install >/dev/null || exit 1
touch "$(host $HOOKLOG)"
if [[ $WATCH == 1 ]]; then
    in_w sh -c "exec $VTS -v watch 2>$W/watch.log" &
    sleep 2
fi
# The lifecycle events, all of them, for the whole run.
EVLOG=$W/events.log
in_w sh -c "exec virsh event --all --loop >$EVLOG 2>&1" &
sleep 1
version=$(in_w virsh version | sed -n 's/^Using library: libvirt \(.*\)/\1/p')

lines() { wc -l <"$1"; }
# The lines of file $1 after line $2, squeezed into one cell ("a; b; c").
since() {
    tail -n +"$(($2 + 1))" "$1" | sed -e 's/^event //' -e "s/ for domain '[^']*'//" \
        -e 's/^2[0-9.: -]*+[0-9]*: //' | grep -v '^$' | paste -sd';' - | sed 's/;/; /g'
}
digest_of() { grep -o '<vts:state [^>]*' | grep -o ' digest="[0-9a-f]\{8\}' | head -n1 | cut -d'"' -f2; }
state_of() { in_w virsh domstate "$1" 2>/dev/null | head -n1; }
wait_helpers() {
    local i
    for i in $(seq 100); do
        pgrep -f "virt-tpm-state store --after-stop" >/dev/null || return 0
        sleep 0.1
    done
}
stop_vm() { in_w virsh destroy "$1" >/dev/null 2>&1; sleep 0.5; wait_helpers; }
secret_of() { in_w "$TPM_SH" read-secret "/var/lib/libvirt/swtpm/$1/tpm2" 2>/dev/null || echo "?"; }
vars_of() {
    local f
    f=$(host "/var/lib/libvirt/qemu/nvram/$1_VARS.fd")
    [[ -f $f ]] || { echo "-"; return; }
    if virt-fw-vars -i "$f" -p 2>/dev/null | grep -q SHIM_VERBOSE; then echo V2; else echo V1; fi
}
backups_of() { ls "$(host /var/lib/virt-tpm-state/backups/$1)" 2>/dev/null | wc -l; }
err_of() { tr '\n' ' ' | sed -e 's/error: //g' -e 's/  */ /g' -e 's/|/\\|/g' | cut -c1-150; }

domain_xml() { # NAME UUID FIRMWARE
    local os="<os><type arch='x86_64' machine='q35'>hvm</type></os>"
    # libvirt 12's autoselection picks a stateless ROM (OVMF.amdsev.fd, no VARS) for this
    # request in Debian sid; the pflash hint keeps the VARS file the rows are about.
    local hint=""
    [[ ${version%%.*} -ge 12 ]] && hint="<loader type='pflash'/>"
    [[ $3 == uefi ]] && os="<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>$hint<firmware><feature enabled='no' name='secure-boot'/></firmware></os><features><acpi/></features>"
    cat <<EOF
<domain type='$KVM'><name>$1</name><uuid>$2</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>
$os<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/$1.qcow2'/><target dev='vda' bus='virtio'/></disk>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>
EOF
}

snapshot_create() { # KIND VM SNAP -> libvirt's output
    local mem=/var/lib/libvirt/images/$2-$3.mem
    case $1 in
    int-mem) in_w virsh snapshot-create-as "$2" "$3" ;;
    int-disk)
        if [[ $(state_of "$2") == running ]]; then
            # A disk-only internal snapshot of a running VM: only through snapshot XML.
            echo "<domainsnapshot><name>$3</name><memory snapshot='no'/><disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>" \
                >"$W/out/snap.xml"
            in_w virsh snapshot-create "$2" "$W/out/snap.xml"
        else
            in_w virsh snapshot-create-as "$2" "$3"
        fi ;;
    ext-disk) in_w virsh snapshot-create-as "$2" "$3" --disk-only --diskspec vda,snapshot=external ;;
    ext-mem) in_w virsh snapshot-create-as "$2" "$3" --memspec "file=$mem,snapshot=external" \
        --diskspec vda,snapshot=external ;;
    esac
}

echo "libvirt $version, $(in_w qemu-system-x86_64 --version | head -n1), swtpm $(in_w swtpm --version 2>&1 | grep -o '[0-9][0-9.]*' | head -n1); revert with: ${REVERT#"$BIN/"}$([[ $WATCH == 1 ]] && echo ", watch daemon running")"
echo
echo "| fw | kind | taken | reverted from | create | hooks at create | revert | events at revert | hooks at revert | state after | element after revert | next run: TPM | VARS | backups |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
n=0
for fw in $FIRMWARE; do
for kind in $KINDS; do
    case $kind in int-mem | ext-mem) takens="running" ;; *) takens="shutoff running" ;; esac
    [[ $fw == bios && $kind == ext-* ]] && continue
for taken in $takens; do
for from in shutoff running; do
    [[ -n ${ONLY:-} && ! "$fw $kind $taken" =~ $ONLY ]] && continue
    n=$((n + 1))
    vm=snap$n uuid=$(cat /proc/sys/kernel/random/uuid) snap=s$n
    row() { echo "| $fw | $kind | $taken | $from | $*"; }
    in_w qemu-img create -q -f qcow2 "/var/lib/libvirt/images/$vm.qcow2" 32M
    domain_xml "$vm" "$uuid" "$fw" >"$W/out/$vm.xml"
    in_w virsh define "$W/out/$vm.xml" >/dev/null || { row "define failed |"; continue; }
    in_w virsh start "$vm" >/dev/null && stop_vm "$vm"
    in_w "$TPM_SH" write-secret "/var/lib/libvirt/swtpm/$uuid/tpm2" S1 >/dev/null
    in_w "$VTS" store "$vm" >/dev/null
    e1=$(in_w virsh dumpxml --inactive "$vm" | digest_of)
    if [[ $taken == running ]]; then
        # S1r: the TPM the VM runs with when the snapshot is taken, never stored (so the
        # snapshot's element holds S1, and a memory snapshot's vmstate holds S1r).
        in_w "$TPM_SH" write-secret "/var/lib/libvirt/swtpm/$uuid/tpm2" S1r >/dev/null
        in_w virsh start "$vm" >/dev/null
        sleep 2
    fi
    h0=$(lines "$(host $HOOKLOG)") e0=$(lines "$EVLOG")
    if out=$(snapshot_create "$kind" "$vm" "$snap" 2>&1); then create=ok; else create="refused: $(err_of <<<"$out")"; fi
    sleep 0.5
    hc=$(since "$(host $HOOKLOG)" "$h0")
    snap_el=$(in_w virsh snapshot-dumpxml "$vm" "$snap" 2>/dev/null | digest_of)
    stop_vm "$vm"
    if [[ $create != ok ]]; then
        row "$create | ${hc:--} | | | | | | | | |"
        in_w virsh undefine --nvram --snapshots-metadata "$vm" >/dev/null 2>&1
        continue
    fi
    # The later state, never stored: secret S2, and a UEFI variable.
    in_w "$TPM_SH" write-secret "/var/lib/libvirt/swtpm/$uuid/tpm2" S2 >/dev/null
    [[ $fw == uefi ]] && virt-fw-vars --inplace "$(host "/var/lib/libvirt/qemu/nvram/${vm}_VARS.fd")" --set-shim-verbose >/dev/null 2>&1
    [[ $from == running ]] && { in_w virsh start "$vm" >/dev/null; sleep 2; }
    b0=$(backups_of "$uuid")
    h0=$(lines "$(host $HOOKLOG)") e0=$(lines "$EVLOG")
    # shellcheck disable=SC2086 # REVERT is a command line
    if out=$(in_w $REVERT "$vm" "$snap" 2>&1); then revert=ok; else revert="refused: $(err_of <<<"$out")"; fi
    sleep 1
    wait_helpers
    hr=$(since "$(host $HOOKLOG)" "$h0") er=$(since "$EVLOG" "$e0")
    after=$(state_of "$vm")
    el=$(in_w virsh dumpxml --inactive "$vm" | digest_of)
    case $el in "$snap_el") elw="snapshot's ($el)" ;; *) elw="$el (snapshot's: $snap_el, E1: $e1)" ;; esac
    # The next run: start it if the revert left it shut off, then stop and read what it ran with.
    [[ $after == "shut off" ]] && { in_w virsh start "$vm" >/dev/null 2>&1; sleep 2; }
    stop_vm "$vm"
    row "$create | ${hc:--} | $revert | ${er:--} | ${hr:--} | $after | $elw | $(secret_of "$uuid") | $(vars_of "$vm") | $(($(backups_of "$uuid") - b0)) |"
    in_w virsh snapshot-delete --metadata "$vm" "$snap" >/dev/null 2>&1
    in_w virsh undefine --nvram --snapshots-metadata "$vm" >/dev/null 2>&1
done
done
done
done
echo
echo "Element digests are 8-hex prefixes. TPM: the NV secret of the next run (S1 = the snapshot's"
echo "element; S1r = the TPM the VM ran with when a running snapshot was taken, never stored, so in"
echo "a memory snapshot's vmstate only; S2 = the later, never stored state). VARS: V1 = snapshot"
echo "time, V2 = the later state. backups: backups our hook made during the revert and next run."
