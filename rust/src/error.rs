//! The one error type of the kernels. The binding layer maps it to Python
//! exceptions; kernels never panic on bad input, they return one of these.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A length, block size or table that does not fit the operation.
    InvalidArgument(String),
    /// A NaN or infinity in data that must be finite (a weight to quantize).
    NonFinite { index: usize },
    /// The backing store of the page store failed: a write or read error, a
    /// full disk, or a backing file that was deleted, truncated or corrupted.
    Storage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) => f.write_str(msg),
            Error::NonFinite { index } => write!(
                f,
                "input contains NaN or infinity (first in the block holding flat element {index}); \
                 quantization needs finite values: replace them (torch.nan_to_num) or find where they came from"
            ),
            Error::Storage(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for an `InvalidArgument` error.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Shorthand for a `Storage` error.
pub(crate) fn storage(msg: impl Into<String>) -> Error {
    Error::Storage(msg.into())
}
