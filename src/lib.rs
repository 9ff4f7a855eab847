//! virt-tpm-state: keep a libvirt VM's emulated TPM (swtpm) state inside its
//! domain XML, so the XML alone recreates the VM with the same TPM.
//!
//! Layout: pure logic ([`state`], [`swtpm`], [`linear`], [`format`](mod@format), `xml`, [`domain`],
//! `decision`) does no I/O; [`fs`] is the one place that touches the
//! filesystem; [`hook`] is the hook's logic (never libvirt); `libvirt` is
//! the only module that speaks to libvirt, used by the store use case
//! (`store`, whose `store::plan` is pure), the watch daemon (`watch`)
//! and the CLI ([`cli`]); the daemon imports nothing from the CLI.

// No unsafe code anywhere in the crate: the README's security section promises it.
#![forbid(unsafe_code)]
// Built without `libvirt` (for the hook), the library is the hook's subset:
// what only the CLI and the watch daemon use is unused there. Dead code is
// checked in the default build, where every user is compiled.
#![cfg_attr(not(feature = "libvirt"), allow(dead_code, unused_imports))]

pub(crate) mod carried;
#[cfg(feature = "libvirt")]
pub mod cli;
pub mod config;
#[cfg(feature = "libvirt")]
pub(crate) mod context;
pub(crate) mod decision;
pub mod domain;
pub mod envelope;
pub(crate) mod exit;
pub mod fault;
pub mod format;
pub mod fs;
pub(crate) mod gc;
pub mod hook;
pub mod input;
#[cfg(feature = "libvirt")]
pub(crate) mod libvirt;
pub mod linear;
pub mod logging;
pub(crate) mod name;
pub mod paths;
pub mod recipients;
pub mod restore;
pub mod state;
pub(crate) mod store;
pub mod swtpm;
#[cfg(feature = "libvirt")]
pub(crate) mod watch;
pub(crate) mod xml;
