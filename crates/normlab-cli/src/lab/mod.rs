//! The lab: networks with and without normalization, and their training.

pub mod conv;
pub mod experiments;
pub mod model;
pub mod plot;
pub mod pool;
pub mod report;
pub mod train;
pub mod verdict;
