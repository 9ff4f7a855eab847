//! The store: a domain's local TPM state (and VARS file) into its metadata.
//!
//! - [`plan`] (pure, built with or without libvirt): from the live and
//!   config element, the local state, the keys, the time and the host to
//!   what a store writes, where and how protected; unit-tested row by row.
//! - `apply` (libvirt): the use case around it, [`store_domain`]: reads the
//!   domain's XML and the settled local state, plans, encodes, checks the
//!   size, writes through `virDomainSetMetadata`, records J and the kept
//!   copy. `store`, `snapshot create`, the pending-store path and the watch
//!   daemon all call it.
//! - [`pending`] (libvirt): completing post-stop stores the hook recorded.

#[cfg(feature = "libvirt")]
mod apply;
#[cfg(feature = "libvirt")]
pub(crate) mod pending;
pub(crate) mod plan;

#[cfg(feature = "libvirt")]
pub(crate) use apply::{check_has_definition, store_domain, StoreDone, StoreError, StoreOptions};
