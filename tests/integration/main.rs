//! The integration tests in one binary: each test binary links the whole of Burn, and ten of
//! them filled CI's disk. `train_bf16` and `train_resume` stay in binaries of their own because
//! they depend on state that is global to the process (the default float type, the CPU backend's
//! random generator).

#[allow(dead_code)]
mod common;

mod cli_binary;
mod cli_features;
mod data_download;
mod data_loader;
mod data_readers;
mod fixtures_lsagt;
mod fixtures_vvt;
mod train_loop;
mod train_units;
