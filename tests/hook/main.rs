//! The hook binary (`virt-tpm-state-hook`) run as libvirt runs it against
//! scratch host trees: the golden cases (tests/cases/), the decision rows,
//! the trust rule, injected faults and hooks racing each other.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod cases;
mod concurrency;
mod faults;
mod hook;
mod trust;
