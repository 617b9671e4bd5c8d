//! `CacheConfig`: a slot cache's options, parsed once from Python-shaped arguments and checked
//! against the pool before anything is allocated.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::policy::PolicyKind;
use crate::pool::ExpertPool;
use crate::prefetch::MAX_QUEUE_CAPACITY;

pub struct CacheConfig {
    pub num_slots: usize,
    pub policy: PolicyKind,
    /// Caller-owned slot memory (device memory on CUDA, host memory on the host backend).
    pub slots_addr: Option<u64>,
    pub copy_workers: usize,
    pub queue_capacity: usize,
    /// How long acquire waits for slots pinned by others before giving up.
    pub acquire_timeout: Duration,
}

/// Most copy worker threads one cache starts.
pub const MAX_COPY_WORKERS: usize = 64;

impl CacheConfig {
    /// The config of Python-shaped arguments (signed counts, a policy name, seconds as a float):
    /// only the conversions are checked here, the ranges by `SlotCache::new`.
    pub fn from_args(
        num_slots: i64,
        policy: &str,
        slots_ptr: Option<i64>,
        copy_workers: i64,
        queue_capacity: i64,
        acquire_timeout: f64,
    ) -> Result<Self> {
        let count = |v: i64, err: &dyn Fn() -> Error| usize::try_from(v).map_err(|_| err());
        let num_slots = count(num_slots, &|| Error::Budget(format!("num_slots must be >= 1, got {num_slots}")))?;
        let policy = PolicyKind::parse(policy)?;
        let copy_workers = count(copy_workers, &|| {
            Error::InvalidArgument(format!("copy_workers must be in 0..={MAX_COPY_WORKERS}, got {copy_workers}"))
        })?;
        let queue_capacity = count(queue_capacity, &|| {
            Error::InvalidArgument(format!("queue_capacity must be in 1..={MAX_QUEUE_CAPACITY}, got {queue_capacity}"))
        })?;
        let slots_addr = match slots_ptr {
            Some(p) if p <= 0 => {
                return Err(Error::InvalidArgument(format!("slots_ptr must be a non-null address, got {p}")))
            }
            p => p.map(|p| p as u64),
        };
        let bad_timeout = || Error::InvalidArgument(format!("acquire_timeout must be > 0 seconds, got {acquire_timeout}"));
        if !(acquire_timeout.is_finite() && acquire_timeout > 0.0) {
            return Err(bad_timeout());
        }
        let acquire_timeout = Duration::try_from_secs_f64(acquire_timeout)
            .map_err(|_| Error::InvalidArgument(format!("acquire_timeout {acquire_timeout} s is too large")))?;
        Ok(Self { num_slots, policy, slots_addr, copy_workers, queue_capacity, acquire_timeout })
    }

    /// The options that need no pool -- a policy name and the copy workers -- checked as
    /// `from_args` and `new` check them (callers check them before they build anything else).
    pub fn check_options(policy: &str, copy_workers: i64) -> Result<PolicyKind> {
        let kind = PolicyKind::parse(policy)?;
        if !(0..=MAX_COPY_WORKERS as i64).contains(&copy_workers) {
            return Err(Error::InvalidArgument(format!("copy_workers must be in 0..={MAX_COPY_WORKERS}, got {copy_workers}")));
        }
        Ok(kind)
    }

    /// Every range, before anything is allocated: each size here becomes an allocation.
    pub(super) fn check(&self, pool: &ExpertPool) -> Result<()> {
        let experts = pool.keys().len();
        if !(1..=experts).contains(&self.num_slots) {
            return Err(Error::Budget(format!(
                "num_slots must be in 1..={experts} (one slot per expert of the pool at most), got {}",
                self.num_slots
            )));
        }
        if self.copy_workers > MAX_COPY_WORKERS {
            return Err(Error::InvalidArgument(format!(
                "copy_workers must be in 0..={MAX_COPY_WORKERS}, got {}",
                self.copy_workers
            )));
        }
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.queue_capacity) {
            return Err(Error::InvalidArgument(format!(
                "queue_capacity must be in 1..={MAX_QUEUE_CAPACITY}, got {}",
                self.queue_capacity
            )));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::InvalidArgument("acquire_timeout must be > 0 seconds, got 0".into()));
        }
        Ok(())
    }
}
