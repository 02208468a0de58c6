//! Attention kinds, each in its own file with a plain O(N²) reference used by the tests.

pub mod lsagt;
pub mod vicinity;

pub use vicinity::{Locality, VicinityAttention, VicinityAttentionConfig};
