// vicinity: silence the warnings a non-autotune build of this vendored crate shows (registry
// crates get --cap-lints; path dependencies do not).
#![allow(unused_imports, dead_code)]
#[macro_use]
extern crate derive_new;

pub mod optim;

mod base;

pub(crate) mod engine;
pub(crate) mod tune;

pub use base::*;
