//! The element format: the fixture vectors and property tests of the
//! reader and writer.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod properties;
mod vectors;
