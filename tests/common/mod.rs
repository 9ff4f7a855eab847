//! The one test harness, shared by every test binary (each declares
//! `#[macro_use] mod common;` first). One module per job:
//!
//! - `env`: the one environment gate, `require!(Env::Root, …)`.
//! - `runner`: the binaries under test, run with a timeout, and the checks
//!   every run gets, printing everything on failure.
//! - `states`: machine states and the domain XML carrying them.
//! - `scratch`: a scratch host tree (`VIRT_TPM_STATE_ROOT`) for the hook and
//!   the CLI.
//! - `tree`: whole trees (kind, owner, mode, digest) and their diff.
//! - `users`: the less trusted users of a Debian host.
//! - `world`: private libvirt worlds (tests/e2e/world.sh), one per "host".
//!
//! A binary uses a part of it, hence `dead_code` allowed here only.
#![allow(dead_code, unused_imports)]

#[macro_use]
pub mod env;
pub mod runner;
pub mod scratch;
pub mod states;
pub mod tree;
pub mod users;
pub mod world;
