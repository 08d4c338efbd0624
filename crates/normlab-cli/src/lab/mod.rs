//! The lab: networks with and without normalization, and their training.

pub mod model;
pub mod train;
