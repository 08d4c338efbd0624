//! The bodies of normlab's fuzz targets, one function each, taking the
//! fuzzer's bytes. The libFuzzer binaries under `fuzz_targets/` call them,
//! and normlab-cli's `tests/fuzz_regressions.rs` replays every input kept
//! under `tests/fuzz-regressions/TARGET/` through the same functions, so a
//! crash once found stays fixed in the ordinary test suite too.
//!
//! The CLI's conformance runner and data loaders are compiled in from their
//! source files: they need only normlab, anyhow, half, serde_json, flate2,
//! sha2 and rand, while depending on normlab-cli would build candle and the
//! rest of the lab with coverage instrumentation.

#[allow(dead_code)]
#[path = "../../crates/normlab-cli/src/conformance.rs"]
pub mod conformance;
#[allow(dead_code)]
#[path = "../../crates/normlab-cli/src/data.rs"]
pub mod data;

#[path = "conformance_case.rs"]
mod conformance_case_target;
#[path = "loaders.rs"]
mod loaders_target;
#[path = "shapes.rs"]
mod shapes_target;
#[path = "state_file.rs"]
mod state_file_target;

pub use conformance_case_target::conformance_case;
pub use loaders_target::{data_dir, idx_files};
pub use shapes_target::shapes;
pub use state_file_target::state_file;
