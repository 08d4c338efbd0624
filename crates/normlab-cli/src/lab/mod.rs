//! The lab: networks with and without normalization, and their training.

pub mod activation;
pub mod conv;
mod cpu;
pub mod experiments;
pub mod linear;
pub mod model;
pub mod optim;
pub mod plot;
pub mod pool;
pub mod report;
pub mod step_bench;
pub mod train;
pub mod verdict;
