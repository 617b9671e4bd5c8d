//! The runtime's error type. Each variant maps to one Python exception class (see `python.rs`).

use std::fmt;

/// Every failure the core can report. The message says what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A budget / slot count is invalid or too small for the request.
    Budget(String),
    /// A (layer, expert) or tensor name that the pool does not hold.
    UnknownExpert(String),
    /// A slot operation that the slot's state forbids.
    SlotState(String),
    /// The object (or the pool / cache it depends on) was closed.
    Closed(String),
    /// A CUDA driver call failed, or CUDA is not available.
    Cuda(String),
    /// A malformed argument (negative size, wrong buffer length, unknown policy name, ...).
    InvalidArgument(String),
    /// Reading a file failed, or its content is malformed.
    Load(String),
    /// A request of a legal size that the allocator could not satisfy.
    OutOfMemory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            Error::Budget(m)
            | Error::UnknownExpert(m)
            | Error::SlotState(m)
            | Error::Closed(m)
            | Error::Cuda(m)
            | Error::InvalidArgument(m)
            | Error::Load(m)
            | Error::OutOfMemory(m) => m,
        };
        f.write_str(msg)
    }
}

impl std::error::Error for Error {}

/// `v` with room reserved for `n` more items, or an OutOfMemory error naming `what`: a size
/// that passed the range checks must still not abort the process when memory is short.
pub fn try_vec<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        Error::OutOfMemory(format!("cannot allocate {what} ({n} entries of {} bytes): {e}", std::mem::size_of::<T>()))
    })?;
    Ok(v)
}
