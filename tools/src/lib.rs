//! The generators of what the repository commits or measures: the fixture
//! vectors (`make-vectors`), the man pages and completions (`gen-docs`), the
//! benchmark inputs (`bench-input`, `bench-rekey`). Run as
//! `cargo run -p tools --bin NAME`; never published, never installed.

pub mod gen_docs;
pub mod stream;
