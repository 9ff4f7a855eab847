#!/bin/bash
# world.sh - a "private libvirt world": a private libvirtd + virtlogd standing in for one host.
#
# How it works: `up DIR` builds scratch copies of the libvirt dirs under DIR/root (a copy of
# the host's /etc/libvirt, empty skeletons of /var/lib/libvirt, /var/log/libvirt, ...), starts a
# holder process (`sleep infinity`) in a new private mount namespace (pid in DIR/holder.pid)
# and bind-mounts every scratch dir over its real path *inside that namespace only*. libvirtd
# and virtlogd are then started inside the namespace, so everything they and their children
# (qemu, swtpm, hooks) read or write lands in DIR/root. The host's own libvirt is never touched;
# only empty mountpoint dirs (e.g. /run/libvirt, /etc/virt-tpm-state) may be created on the host.
# Several worlds can run at once (each has its own /run/libvirt, so its own sockets): each is
# one "host". `down DIR` kills exactly the processes in that namespace. `up` on a DIR that was
# brought `down` reuses its scratch dirs: that is a host reboot that keeps its disks.
#
# Usage:
#   world.sh up DIR            create/start the world in DIR (absolute path)
#   world.sh exec DIR CMD...   run CMD inside the world (LIBVIRT_DEFAULT_URI=qemu:///system)
#   world.sh reload DIR        SIGHUP the world's libvirtd (rediscovers hooks), wait for it
#   world.sh down DIR          stop everything of that world (idempotent)
#   world.sh status DIR        exit 0 if the world is up
#   world.sh host-check        fingerprint of the host's libvirt dirs (run on the host)
#
# With WORLD_OVERLAY="/usr /etc /var" (absolute dirs) `up` also mounts, inside the world only,
# an overlayfs over each of them whose writes land in DIR/overlay/<name>/upper (before the
# scratch binds, which stay on top): `dpkg -i` inside such a world installs a package into
# scratch, its dpkg database and maintainer scripts included, and the host's /usr, /etc and
# /var never change (tests/package.rs). With VTS_WORLD_ROOTFS the overlays cover the root's
# dirs instead, so a package test installs into a fresh copy of a pristine root every time.
#
# A relocated /var/lib/libvirt: with WORLD_LIBVIRT_LIB_LINK=1 at `up`, /var/lib/libvirt inside
# the world is a symlink made by root, as an administrator relocating libvirt to a bigger disk
# makes it: /var/lib (of the host, or of VTS_WORLD_ROOTFS) gets an overlay, inside the world
# only, whose upper dir (DIR/overlay/var_lib-link/upper, prepared before the mount) holds
# `libvirt -> /var/lib/libvirt-real` and an empty `libvirt-real`; the scratch /var/lib/libvirt
# is bound on /var/lib/libvirt-real. Nothing is removed or written below the host's /var/lib
# (the upper entry only hides the host's dir inside the world), and DIR/root/var/lib/libvirt
# stays the scratch tree. Give it again at every `up` of that DIR.
#
# Files in DIR: root/ (scratch trees), holder.pid, holder.ns, libvirtd.pid, virtlogd.pid,
# libvirtd.log (libvirtd's log, hook calls at debug level), virtlogd.log, rootfs (see below).
#
# Another libvirt: with VTS_WORLD_ROOTFS=/abs/root at `up` (a Debian root with its own libvirt,
# QEMU and swtpm, e.g. from scripts/make-root.sh bookworm-bpo|sid), the world runs that root's
# programs instead of the host's: in the world's namespace the root gets /proc, /sys, /dev
# (with a /dev/kvm for the root's kvm group), /tmp, a private /run, this project's dir and DIR
# at the same absolute paths, and the scratch dirs over its libvirt dirs; the daemons and every
# `exec` run chrooted into it. /etc/libvirt is copied from the root, not from the host, and the
# skeleton's owners are the root's users. The root is recorded in DIR/rootfs, so exec, reload
# and down need no variable. The root itself is never written (only mountpoint dirs made).
set -euo pipefail

# Real path -> "mode owner:group" of the scratch dir created for it (if not copied).
# /etc/libvirt is copied from the host; the others start as empty skeletons.
BIND_DIRS=(
    /etc/libvirt
    /var/lib/libvirt
    /var/log/libvirt
    /var/cache/libvirt
    /var/log/swtpm
    /var/lib/swtpm-localca
    /run/libvirt
    /etc/virt-tpm-state
    /var/lib/virt-tpm-state
    /run/virt-tpm-state
)

# Skeleton: path mode owner:group (as Debian's packages ship them)
SKELETON=(
    "/var/lib/libvirt 755 root:root"
    "/var/lib/libvirt/images 711 root:root"
    "/var/lib/libvirt/boot 711 root:root"
    "/var/lib/libvirt/qemu 750 libvirt-qemu:libvirt-qemu"
    "/var/lib/libvirt/qemu/channel 750 libvirt-qemu:libvirt-qemu"
    "/var/lib/libvirt/qemu/channel/target 750 libvirt-qemu:libvirt-qemu"
    "/var/lib/libvirt/qemu/nvram 755 root:root"
    "/var/lib/libvirt/sanlock 700 root:root"
    "/var/log/libvirt 755 root:root"
    "/var/log/libvirt/qemu 755 root:root"
    "/var/log/libvirt/lxc 755 root:root"
    "/var/cache/libvirt 711 root:root"
    "/var/cache/libvirt/qemu 711 root:root"
    "/var/log/swtpm 755 root:root"
    "/var/lib/swtpm-localca 750 tss:root"
    "/run/libvirt 755 root:root"
    "/etc/virt-tpm-state 755 root:root"
    "/var/lib/virt-tpm-state 755 root:root"
    "/run/virt-tpm-state 755 root:root"
)

# WORLD_LIBVIRT_LIB_LINK=1: where the link /var/lib/libvirt points inside the world.
LIB_LINK_TARGET=/var/lib/libvirt-real

SANE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PROJECT_DIR=$(cd "$(dirname "$0")/../.." && pwd -P)

die() { echo "world.sh: $*" >&2; exit 1; }

need_dir() {
    [[ $# -ge 1 && -n $1 ]] || die "missing DIR"
    [[ $1 == /* ]] || die "DIR must be absolute: $1"
}

ns_of() { readlink "/proc/$1/ns/mnt" 2>/dev/null || true; }

# Prints the holder pid if the world in $1 is up (holder alive, namespace as recorded).
holder_pid() {
    local dir=$1 pid ns
    [[ -f $dir/holder.pid && -f $dir/holder.ns ]] || return 1
    pid=$(<"$dir/holder.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    ns=$(ns_of "$pid")
    [[ -n $ns && $ns == "$(<"$dir/holder.ns")" ]] || return 1
    echo "$pid"
}

# The world's root file system ("" = the host's), recorded at `up`.
rootfs_of() {
    [[ -f $1/rootfs ]] && cat "$1/rootfs"
    return 0
}

# The prefix that enters the world's root: nothing, or `chroot ROOT env --chdir=CWD`
# (CWD: $2, a path that exists inside the root).
enter_root() {
    local rootfs
    rootfs=$(rootfs_of "$1")
    [[ -n $rootfs ]] && printf '%s\0' chroot "$rootfs" env --chdir="$2"
    return 0
}

# Run a command inside the world's mount namespace with a clean environment.
in_world() {
    local dir=$1 pid enter=()
    shift
    pid=$(holder_pid "$dir") || die "world $dir is not up"
    mapfile -d '' -t enter < <(enter_root "$dir" /)
    nsenter -t "$pid" -m -- "${enter[@]}" env -i PATH="$SANE_PATH" HOME=/root LC_ALL=C \
        LIBVIRT_DEFAULT_URI=qemu:///system "$@"
}

# uid:gid of user:group as the world's root (host or VTS_WORLD_ROOTFS) knows them.
ids_of() {
    local rootfs=$1 own=$2 u g
    u=${own%%:*} g=${own##*:}
    if [[ -z $rootfs ]]; then
        echo "$u:$g"
        return 0
    fi
    u=$(chroot "$rootfs" id -u "$u") || die "user $u does not exist in $rootfs"
    g=$(chroot "$rootfs" getent group "$g" | cut -d: -f3)
    [[ -n $g ]] || die "group ${own##*:} does not exist in $rootfs"
    echo "$u:$g"
}

# Where the scratch copy of $1 (one of BIND_DIRS) is bound inside the world.
bind_target() {
    if [[ ${WORLD_LIBVIRT_LIB_LINK:-} == 1 && $1 == /var/lib/libvirt ]]; then
        echo "$LIB_LINK_TARGET"
    else
        echo "$1"
    fi
}

# WORLD_LIBVIRT_LIB_LINK=1 (see the header): an overlay over $3/var/lib ($3: the world's root
# file system, "" for the host's) in the namespace of $1, whose upper dir (in $2) holds the link.
link_var_lib_libvirt() {
    local holder=$1 dir=$2 rootfs=$3 lib=$3/var/lib up=$2/overlay/var_lib-link
    mkdir -p "$up/upper" "$up/work"
    # The merged /var/lib looks like the real one (owner, mode).
    chown --reference="$lib" "$up/upper"
    chmod --reference="$lib" "$up/upper"
    if [[ ! -L $up/upper/libvirt ]]; then
        rm -rf "${up:?}/upper/libvirt"
        ln -s "$LIB_LINK_TARGET" "$up/upper/libvirt"
    fi
    install -d -m 0755 -o 0 -g 0 "$up/upper/${LIB_LINK_TARGET##*/}"
    nsenter -t "$holder" -m -- mount -t overlay world-var_lib-link \
        -o "lowerdir=$lib,upperdir=$up/upper,workdir=$up/work" "$lib"
    # Inside the world: a link, made by root, in a root-owned dir others cannot write.
    [[ $(nsenter -t "$holder" -m -- stat -c '%F %u' "$lib/libvirt") == "symbolic link 0" ]]
}

# Mounts the world's root for the namespace of $1 (holder pid): see the header.
mount_rootfs() {
    local holder=$1 dir=$2 rootfs=$3 d d2 kvm_gid
    local -a ns=(nsenter -t "$holder" -m --)
    "${ns[@]}" mount --rbind /proc "$rootfs/proc"
    "${ns[@]}" mount --rbind /sys "$rootfs/sys"
    "${ns[@]}" mount --rbind /dev "$rootfs/dev"
    "${ns[@]}" mount --bind /tmp "$rootfs/tmp"
    "${ns[@]}" mount -t tmpfs -o mode=0755 tmpfs "$rootfs/run"
    # The host's /dev/kvm belongs to the host's kvm group, which is another gid in the root:
    # give the root a node of its own (on the private /run) so its qemu user can open it.
    if [[ -c /dev/kvm ]]; then
        kvm_gid=$(chroot "$rootfs" getent group kvm | cut -d: -f3)
        if [[ -n $kvm_gid ]]; then
            "${ns[@]}" mknod -m 0660 "$rootfs/run/.world-kvm" c 10 232
            "${ns[@]}" chgrp "$kvm_gid" "$rootfs/run/.world-kvm"
            "${ns[@]}" mount --bind "$rootfs/run/.world-kvm" "$rootfs/dev/kvm"
        fi
    fi
    for d in "$PROJECT_DIR" "$dir"; do
        mkdir -p "$rootfs$d"
        "${ns[@]}" mount --bind "$d" "$rootfs$d"
    done
    for d in "${BIND_DIRS[@]}"; do
        d2=$(bind_target "$d")
        "${ns[@]}" mkdir -p "$rootfs$d2"
        "${ns[@]}" mount --bind "$dir/root$d" "$rootfs$d2"
    done
}

wait_virsh() {
    local dir=$1 secs=$2 i
    for ((i = 0; i < secs * 4; i++)); do
        if in_world "$dir" timeout 5 virsh -q -c qemu:///system list --all >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.25
    done
    return 1
}

# Set (replace or append) `key = value` in a libvirt config file.
conf_set() {
    local file=$1 key=$2 value=$3
    sed -i -E "/^[[:space:]]*#?[[:space:]]*${key}[[:space:]]*=.*/d" "$file"
    printf '%s = %s\n' "$key" "$value" >>"$file"
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

read_pidfile() {
    local f=$1 p
    [[ -f $f ]] || return 0
    p=$(<"$f")
    p=${p//[^0-9]/}
    echo "$p"
}

cmd_up() {
    need_dir "${1:-}"
    local dir=$1 root=$1/root entry path mode own d holder hostns i rootfs=${VTS_WORLD_ROOTFS:-}
    if holder_pid "$dir" >/dev/null; then
        die "world $dir is already up"
    fi
    if [[ -n $rootfs ]]; then
        [[ $rootfs == /* ]] || die "VTS_WORLD_ROOTFS must be absolute: $rootfs"
        [[ -x $rootfs/usr/sbin/libvirtd ]] || die "VTS_WORLD_ROOTFS=$rootfs has no usr/sbin/libvirtd; build it with scripts/make-root.sh bookworm-bpo|sid"
        rootfs=$(cd "$rootfs" && pwd -P)
    fi
    mkdir -p "$dir"
    if [[ -e $dir/rootfs || -d $root ]] && [[ $(rootfs_of "$dir") != "$rootfs" ]]; then
        die "world $dir was made with another root file system ('$(rootfs_of "$dir")'); use a new DIR"
    fi
    if [[ -n $rootfs ]]; then echo "$rootfs" >"$dir/rootfs"; else rm -f "$dir/rootfs"; fi
    # /run is a tmpfs on a real host: a world brought up again ("rebooted") starts with
    # empty runtime dirs, but keeps its /etc and /var scratch trees.
    rm -rf "$root/run"
    for entry in "${SKELETON[@]}"; do
        read -r path mode own <<<"$entry"
        if [[ ! -d $root$path ]]; then
            own=$(ids_of "$rootfs" "$own")
            install -d -m "$mode" -o "${own%%:*}" -g "${own##*:}" "$root$path"
        fi
    done
    if [[ ! -e $root/etc/libvirt/.world-copied ]]; then
        mkdir -p "$root/etc"
        cp -a "$rootfs/etc/libvirt" "$root/etc/"
        touch "$root/etc/libvirt/.world-copied"
    fi
    mkdir -p "$root/etc/libvirt/hooks/qemu.d"

    local lconf=$root/etc/libvirt/libvirtd.conf qconf=$root/etc/libvirt/qemu.conf
    conf_set "$lconf" auth_unix_ro '"none"'
    conf_set "$lconf" auth_unix_rw '"none"'
    conf_set "$lconf" unix_sock_rw_perms '"0770"'
    conf_set "$lconf" log_level 3
    conf_set "$lconf" log_filters '"1:util.hook 1:qemu.qemu_tpm 1:qemu.qemu_extdevice"'
    conf_set "$lconf" log_outputs "\"1:file:$dir/libvirtd.log\""
    conf_set "$qconf" security_driver '"none"'
    # No cgroups (they are shared with the host and other worlds) and no private /dev
    # namespace for qemu (so qemu stays in the world's mount namespace and `down` finds it).
    conf_set "$qconf" cgroup_controllers '[ ]'
    conf_set "$qconf" namespaces '[ ]'
    conf_set "$root/etc/libvirt/virtlogd.conf" log_outputs "\"3:file:$dir/virtlogd.log\""

    # Mountpoints on the host (empty dirs only; with a root they are made inside it).
    if [[ -z $rootfs ]]; then
        for d in "${BIND_DIRS[@]}"; do
            [[ -d $d ]] || mkdir -p "$d"
        done
    fi

    hostns=$(ns_of $$)
    setsid unshare --mount --propagation private -- sleep infinity </dev/null >/dev/null 2>&1 &
    holder=$!
    for ((i = 0; i < 100; i++)); do
        [[ $(ns_of "$holder") != "$hostns" && -n $(ns_of "$holder") ]] && break
        sleep 0.05
    done
    [[ $(ns_of "$holder") != "$hostns" ]] || { kill "$holder" 2>/dev/null; die "unshare failed"; }
    echo "$holder" >"$dir/holder.pid"
    ns_of "$holder" >"$dir/holder.ns"

    local o name
    for o in ${WORLD_OVERLAY:-}; do
        # With a root, the overlay covers the root's dir: the root stays as
        # built (and reusable), every world gets a fresh, writable copy.
        [[ $o == /* && -d $rootfs$o ]] || { cmd_down "$dir"; die "WORLD_OVERLAY: $o is not an absolute dir"; }
        name=${o#/}
        name=${name//\//_}
        mkdir -p "$dir/overlay/$name/upper" "$dir/overlay/$name/work"
        nsenter -t "$holder" -m -- mount -t overlay "world-$name" \
            -o "lowerdir=$rootfs$o,upperdir=$dir/overlay/$name/upper,workdir=$dir/overlay/$name/work" "$rootfs$o" \
            || { cmd_down "$dir"; die "cannot mount an overlay over $rootfs$o"; }
    done
    if [[ ${WORLD_LIBVIRT_LIB_LINK:-} == 1 ]]; then
        link_var_lib_libvirt "$holder" "$dir" "$rootfs" \
            || { cmd_down "$dir"; die "cannot make /var/lib/libvirt a link inside the world"; }
    fi
    if [[ -n $rootfs ]]; then
        mount_rootfs "$holder" "$dir" "$rootfs" || { cmd_down "$dir"; die "cannot mount $rootfs for the world"; }
    else
        for d in "${BIND_DIRS[@]}"; do
            nsenter -t "$holder" -m -- mount --bind "$root$d" "$(bind_target "$d")"
        done
    fi

    : >"$dir/libvirtd.log"
    in_world "$dir" virtlogd -d --pid-file "$dir/virtlogd.pid" </dev/null >/dev/null 2>&1 \
        || { cmd_down "$dir"; die "virtlogd failed to start"; }
    in_world "$dir" libvirtd -d --pid-file "$dir/libvirtd.pid" </dev/null >/dev/null 2>&1 \
        || { tail -n 50 "$dir/libvirtd.log" >&2; cmd_down "$dir"; die "libvirtd failed to start"; }
    if ! wait_virsh "$dir" 20; then
        echo "--- $dir/libvirtd.log (tail) ---" >&2
        tail -n 80 "$dir/libvirtd.log" >&2 || true
        cmd_down "$dir"
        die "libvirtd in $dir did not answer within 20s"
    fi
    echo "world $dir is up (holder $holder${rootfs:+, root $rootfs})" >&2
}

cmd_exec() {
    need_dir "${1:-}"
    local dir=$1 pid enter=()
    shift
    [[ $# -ge 1 ]] || die "exec: missing CMD"
    pid=$(holder_pid "$dir") || die "world $dir is not up"
    mapfile -d '' -t enter < <(enter_root "$dir" "$PWD")
    exec nsenter -t "$pid" -m --wd="$PWD" -- "${enter[@]}" env LIBVIRT_DEFAULT_URI=qemu:///system "$@"
}

cmd_reload() {
    need_dir "${1:-}"
    local dir=$1 pid
    holder_pid "$dir" >/dev/null || die "world $dir is not up"
    pid=$(read_pidfile "$dir/libvirtd.pid")
    pid_alive "$pid" || die "libvirtd of $dir is not running"
    kill -HUP "$pid"
    sleep 0.5
    wait_virsh "$dir" 20 || die "libvirtd of $dir did not answer after SIGHUP"
}

# Pids of all processes in the mount namespace $1, except $2.
pids_in_ns() {
    local ns=$1 skip=$2 p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$skip" || $p == "$$" ]] && continue
        [[ $(ns_of "$p") == "$ns" ]] && echo "$p"
    done
    return 0
}

cmd_down() {
    need_dir "${1:-}"
    local dir=$1 holder ns dom p pids i
    [[ -f $dir/holder.ns ]] || return 0
    ns=$(<"$dir/holder.ns")
    if ! holder=$(holder_pid "$dir"); then
        # Holder gone: only go on if a daemon of this world still lives in its namespace
        # (namespace inode numbers can be reused once a namespace is gone).
        holder=
        local alive=
        for p in "$(read_pidfile "$dir/libvirtd.pid")" "$(read_pidfile "$dir/virtlogd.pid")"; do
            pid_alive "$p" && [[ $(ns_of "$p") == "$ns" ]] && alive=1
        done
        if [[ -z $alive ]]; then
            rm -f "$dir/holder.pid" "$dir/holder.ns" "$dir/libvirtd.pid" "$dir/virtlogd.pid"
            return 0
        fi
    fi
    p=$(read_pidfile "$dir/libvirtd.pid")
    if [[ -n $holder ]] && pid_alive "$p" && [[ $(ns_of "$p") == "$ns" ]]; then
        while read -r dom; do
            [[ -n $dom ]] || continue
            in_world "$dir" timeout 20 virsh -q destroy "$dom" >/dev/null 2>&1 || true
        done < <(in_world "$dir" timeout 10 virsh -q list --name 2>/dev/null || true)
        kill -TERM "$p" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do pid_alive "$p" || break; sleep 0.25; done
    fi
    p=$(read_pidfile "$dir/virtlogd.pid")
    if pid_alive "$p" && [[ $(ns_of "$p") == "$ns" ]]; then
        kill -TERM "$p" 2>/dev/null || true
    fi
    # Whatever is left in the namespace (qemu, swtpm, hooks, helpers): TERM, then KILL.
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        pids=$(pids_in_ns "$ns" "$holder")
        [[ -n $pids ]] || break
        if [[ $i -eq 1 ]]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
        elif [[ $i -ge 12 ]]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        sleep 0.25
    done
    pids=$(pids_in_ns "$ns" "$holder")
    [[ -z $pids ]] || echo "world.sh: warning: still alive in $dir: $pids" >&2
    if [[ -n $holder ]]; then
        kill -KILL "$holder" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do pid_alive "$holder" || break; sleep 0.05; done
    fi
    rm -f "$dir/holder.pid" "$dir/holder.ns" "$dir/libvirtd.pid" "$dir/virtlogd.pid"
    echo "world $dir is down" >&2
}

cmd_status() {
    need_dir "${1:-}"
    holder_pid "$1" >/dev/null
}

cmd_host_check() {
    local d existing=()
    for d in "${BIND_DIRS[@]}"; do
        [[ -e $d ]] && existing+=("$d")
    done
    {
        if [[ ${#existing[@]} -gt 0 ]]; then
            find "${existing[@]}" -mindepth 1 -printf '%p %y %s %m %u:%g %T@\n' 2>/dev/null || true
        fi
    } | LC_ALL=C sort | sha256sum | cut -d' ' -f1
}

main() {
    [[ $# -ge 1 ]] || die "usage: world.sh up|exec|reload|down|status DIR ... | host-check"
    local cmd=$1
    shift
    case $cmd in
        up) cmd_up "$@" ;;
        exec) cmd_exec "$@" ;;
        reload) cmd_reload "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        host-check) cmd_host_check ;;
        *) die "unknown command: $cmd" ;;
    esac
}

main "$@"
