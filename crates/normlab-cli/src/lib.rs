//! The `normlab` command's library: conformance runner, bench suite and data sets.
//! The binary (`src/main.rs`) is a thin clap front end over these modules.

pub mod bench;
pub mod conformance;
pub mod data;
pub mod lab;
