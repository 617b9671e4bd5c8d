//! sida-moe's native runtime: pinned expert pools, a device slot cache with eviction policies,
//! a two-lane prefetch queue with copy workers, and device backends (CUDA driver API or host).
//!
//! The core has no Python dependency (`cargo test` needs no libpython); the PyO3 bindings live in
//! `bindings/`, compiled with the `python` feature that maturin enables.

pub mod cache;
pub mod cuda_device;
pub mod cuda_driver;
pub mod deferred;
pub mod device;
pub mod error;
pub mod expert_table;
pub mod policy;
pub mod pool;
pub mod prefetch;
pub mod simulate;
pub mod slot_cache;
pub mod stats;

#[cfg(feature = "python")]
mod bindings;
