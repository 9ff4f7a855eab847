#!/bin/bash
# Builds the Debian package from this checkout and prints its path
# (target/debian/virt-tpm-state_VERSION-1_ARCH.deb):
#   1. the release binaries (scripts/build-release.sh: the CLI, and the hook
#      linked statically without libvirt);
#   2. the man pages and shell completions, generated from the clap
#      definitions (tools/src/gen_docs.rs), so they never drift;
#   3. the package, with cargo-deb (pinned, scripts/install-deps.sh) from
#      [package.metadata.deb] in Cargo.toml and the scripts in dist/deb/.
# Needs no root. Install with `sudo apt install ./target/debian/virt-tpm-state_*.deb`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb.sh: cargo-deb is missing; run scripts/install-deps.sh" >&2
    exit 1
fi
if [ "$(rustc -vV | sed -n 's/^host: //p')" != x86_64-unknown-linux-gnu ]; then
    # Cargo.toml's asset list names the static hook's target dir.
    echo "build-deb.sh: the package is built for x86_64-unknown-linux-gnu only" >&2
    exit 1
fi

# Staged in target/pkg/: the static hook lives in a target-triple dir, which
# cargo-deb does not take as an asset path.
hook=$(./scripts/build-release.sh | tail -n 1)
rm -rf target/pkg
mkdir -p target/pkg
cp "$hook" target/pkg/virt-tpm-state-hook
# cargo-deb strips the binaries it builds; this one it takes as a plain file.
# .comment too: only the compiler's name, which lintian flags as unneeded.
strip --remove-section=.comment target/pkg/virt-tpm-state-hook
cargo run --locked --quiet -p tools --bin gen-docs -- target/pkg >/dev/null
# -n: no name or time stamp inside, so the same sources give the same bytes.
gzip -9n target/pkg/man/*
mkdir -p target/debian
rm -f target/debian/virt-tpm-state_*.deb
cargo deb --no-build --quiet --output target/debian/ >/dev/null
ls target/debian/virt-tpm-state_*.deb
