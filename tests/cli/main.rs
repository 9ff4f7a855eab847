//! The CLI (`virt-tpm-state`) without a world or with one: the manager
//! contract, the watch daemon and linear TPM files.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod linear;
mod manager;
mod watch;
