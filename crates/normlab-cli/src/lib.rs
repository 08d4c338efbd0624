//! The `normlab` command's library: conformance runner and bench suite.
//! The binary (`src/main.rs`) is a thin clap front end over these modules.

pub mod bench;
pub mod conformance;
