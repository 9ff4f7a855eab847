//! Private libvirt worlds (tests/e2e/world.sh), one per "host": the use
//! cases end to end against a real libvirtd, swtpm and tpm2-tools. One
//! binary, one module per subject; scripts/test.sh runs it in its own lane.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod e2e;
mod encryption;
mod integrity;
mod nvram;
