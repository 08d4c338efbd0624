//! The lab: networks with and without normalization, and their training.

pub mod model;
pub mod plot;
pub mod train;
