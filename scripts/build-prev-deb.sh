#!/bin/bash
# Builds (or reuses) the "previous released build" the package upgrade test
# starts from (tests/package.rs, docs/PACKAGING.md), and prints its path.
#
# There are no published releases, so the previous release is defined as the
# package built from a pinned earlier commit of this repository, with that
# commit's own scripts/build-deb.sh (its maintainer scripts, its config, its
# binaries). The repository's version has stayed 0.1.0, so the built package
# is relabelled 0.1.0~git<commit>-1, below this checkout's 0.1.0-1: apt then
# sees a real upgrade (an equal version would be "already the newest").
# Only the control file's Version changes; every file is as that commit built it.
#
# The pinned commit is the last one before the package lifecycle test whose
# packaging differs from today's: its config.toml differs from the one shipped
# now (so an edited config meets a changed shipped version on upgrade, where
# dpkg would prompt for a conffile) and it was built by the previous
# maintainer scripts. Move it forward deliberately, when a release is made.
#
# Built from `git archive` (no worktree is registered, the checkout is not
# touched) under target/prev-deb/, in its own target dir: a full release
# build the first time (about 4 minutes here), reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PREV_COMMIT=55d91fad8d17d7dc808f557dc7535a651878ec67
short=${PREV_COMMIT:0:7}
version=0.1.0~git$short-1
out=target/prev-deb/virt-tpm-state_${version}_amd64.deb
if [[ -f $out ]]; then
    echo "==> previous build: reusing $out" >&2
    echo "$PWD/$out"
    exit 0
fi
if ! git cat-file -e "$PREV_COMMIT^{commit}" 2>/dev/null; then
    # A shallow clone (as some CI systems make): fetch the history once.
    if [[ $(git rev-parse --is-shallow-repository) == true ]]; then
        echo "==> previous build: shallow clone, fetching history for $short" >&2
        git fetch --quiet --unshallow >&2 || true
    fi
fi
if ! git cat-file -e "$PREV_COMMIT^{commit}" 2>/dev/null; then
    echo "build-prev-deb.sh: commit $PREV_COMMIT is not in this clone and could not be fetched; fetch it: git fetch --unshallow" >&2
    exit 1
fi
src=target/prev-deb/src-$short
rm -rf "$src"
mkdir -p "$src"
git archive "$PREV_COMMIT" | tar -x -C "$src"
echo "==> previous build: building $short (its own scripts/build-deb.sh)" >&2
built=$("$src/scripts/build-deb.sh" | tail -n 1)
built=$src/${built#"$PWD/$src/"}
[[ -f $built ]] || { echo "build-prev-deb.sh: $short's build-deb.sh printed no package" >&2; exit 1; }
# Relabel: unpack, change Version in the control file only, pack again.
unpacked=target/prev-deb/unpacked
rm -rf "$unpacked"
dpkg-deb -R "$built" "$unpacked"
sed -i "s/^Version: .*/Version: $version/" "$unpacked/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz -b "$unpacked" "$out.partial" >/dev/null
mv "$out.partial" "$out"
# Its sources and build tree (about 800 MB) are not needed again.
rm -rf "$unpacked" "$src"
echo "$PWD/$out"
