pub(crate) mod executor;
pub(crate) mod input;
pub(crate) mod output;
pub(crate) mod runner;
pub(crate) mod vectorization;

pub(crate) mod plan;
pub use plan::*;

mod base;
pub use base::*;
