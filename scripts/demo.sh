#!/bin/bash
# The main job, self-contained: a VM's TPM survives undefine + define from
# its XML. Everything runs in a private libvirt world (its own libvirtd in a
# private mount namespace); the host's libvirt and VMs are never touched.
# Run as root on Debian 12:   sudo ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Installing what is missing and building"
./scripts/install-deps.sh
cargo build --locked --quiet
./scripts/build-hook.sh --quiet   # without the CLI's libvirt feature
cli=$repo/target/debug/virt-tpm-state

world=$repo/target/demo-world
tests/e2e/world.sh down "$world" >/dev/null 2>&1 || true
rm -rf "$world"
[ -n "${KEEP_WORLD:-}" ] || trap 'tests/e2e/world.sh down "$world" >/dev/null 2>&1 || true' EXIT
in_world() { tests/e2e/world.sh exec "$world" "$@"; }

step "Starting a private libvirt world (its own libvirtd, scratch /etc/libvirt and /var/lib/libvirt)"
tests/e2e/world.sh up "$world" >/dev/null
in_world virsh version --daemon | sed 's/^/    /'

step "Installing the hook, as a user would: virt-tpm-state install"
in_world "$cli" install | sed 's/^/    /'

uuid=5e1f7c3a-0d4b-4c2e-9a61-d3e0b2f8c9a1
virt_type=kvm
[ -e /dev/kvm ] || virt_type=qemu
xml=$world/demo-vm.xml
cat >"$xml" <<XML
<domain type='$virt_type'>
  <name>demo-vm</name>
  <uuid>$uuid</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
XML
state=/var/lib/libvirt/swtpm/$uuid/tpm2

step "Creating a VM with an emulated TPM 2.0; one start lets libvirt manufacture the TPM"
in_world virsh define "$xml" | sed '/^$/d; s/^/    /'
in_world virsh start demo-vm | sed '/^$/d; s/^/    /'
in_world virsh destroy demo-vm | sed '/^$/d; s/^/    /'

secret="demo-secret-$(date +%s)"
step "Writing a secret into the TPM (NV index 0x1500016): $secret"
in_world tests/e2e/tpm.sh write-secret "$state" "$secret"
ek_before=$(in_world tests/e2e/tpm.sh ek-pub "$state")
echo "    endorsement key fingerprint: $ek_before"

step "Storing the TPM state into the domain's metadata: virt-tpm-state store demo-vm"
in_world "$cli" store demo-vm | sed 's/^/    /'
in_world "$cli" show demo-vm | sed 's/^/    /'

step "Saving the XML and undefining the VM (libvirt deletes its TPM state)"
in_world virsh dumpxml demo-vm >"$world/demo-vm.saved.xml"
echo "    saved $(wc -c <"$world/demo-vm.saved.xml") bytes of domain XML"
in_world virsh undefine demo-vm | sed '/^$/d; s/^/    /'
if in_world test -e "/var/lib/libvirt/swtpm/$uuid"; then
    echo "    unexpected: libvirt kept $state" >&2
    exit 1
fi
echo "    /var/lib/libvirt/swtpm/$uuid is gone"

step "Defining the VM again from the saved XML and starting it"
in_world virsh define "$world/demo-vm.saved.xml" | sed '/^$/d; s/^/    /'
in_world virsh start demo-vm | sed '/^$/d; s/^/    /'
in_world virsh destroy demo-vm | sed '/^$/d; s/^/    /'

step "Reading the secret back from the VM's TPM"
got=$(in_world tests/e2e/tpm.sh read-secret "$state")
ek_after=$(in_world tests/e2e/tpm.sh ek-pub "$state")
echo "    secret:                      $got"
echo "    endorsement key fingerprint: $ek_after"
if [ "$got" = "$secret" ] && [ "$ek_after" = "$ek_before" ]; then
    printf '\n\033[1;32mThe TPM survived undefine + define: same secret, same endorsement key.\033[0m\n'
else
    printf '\n\033[1;31mThe TPM changed: expected %s / %s\033[0m\n' "$secret" "$ek_before" >&2
    exit 1
fi
