//! The kernels' error type. No PyO3 here: the binding maps each variant onto a Python exception
//! (`InvalidArgument` → `ValueError`, `IndexOutOfRange` → `IndexError`, `Allocation` → `MemoryError`).

use std::fmt;

/// Why a kernel refused its input. Every variant names the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A shape, length or value that the kernel cannot accept.
    InvalidArgument { arg: &'static str, message: String },
    /// An index (token id, position) outside the valid range. `flat_index` is the position of the
    /// first bad entry in the flattened argument, so the caller can report it in its own shape.
    IndexOutOfRange { arg: &'static str, flat_index: usize, value: i128, size: usize },
    /// An output whose size overflows `usize` or cannot be allocated.
    Allocation { arg: &'static str, elements: Option<usize> },
}

impl KernelError {
    pub fn invalid(arg: &'static str, message: impl Into<String>) -> Self {
        KernelError::InvalidArgument { arg, message: message.into() }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::InvalidArgument { arg, message } => write!(f, "{arg}: {message}"),
            KernelError::IndexOutOfRange { arg, flat_index, value, size } => write!(
                f,
                "{arg}: entry {flat_index} (flattened) is {value}, outside the valid range [0, {size})"
            ),
            KernelError::Allocation { arg, elements: Some(n) } => {
                write!(f, "{arg}: cannot allocate an output of {n} elements")
            }
            KernelError::Allocation { arg, elements: None } => {
                write!(f, "{arg}: the output size overflows the address space")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// The product of `dims`, or `None` when it overflows `usize`.
pub fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The product of `dims`, or an `Allocation` error naming `arg` when it overflows `usize`.
pub fn checked_product(arg: &'static str, dims: &[usize]) -> Result<usize, KernelError> {
    product(dims).ok_or(KernelError::Allocation { arg, elements: None })
}

/// An `InvalidArgument` naming `arg` unless a slice of `len` elements has the `expected` length
/// (`None`: the expected length overflowed, so no slice can have it).
pub fn expect_len(arg: &'static str, len: usize, expected: Option<usize>) -> Result<(), KernelError> {
    if Some(len) == expected {
        Ok(())
    } else {
        Err(KernelError::invalid(arg, format!("has {len} elements, expected {expected:?}")))
    }
}
