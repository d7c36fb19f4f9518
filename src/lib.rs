//! attnkit: the core of a transformer on the CPU, for NumPy.
//!
//! Static token embeddings become contextual ones in three steps, each a module here:
//!
//! * [`kernels::embedding`]: embedding lookup and bag reductions (`embedding`, `embedding_bag`);
//! * [`kernels::positional`]: sinusoidal encodings and the cos/sin tables of rotary embeddings,
//!   with the vectorisable float64 sine and cosine of [`kernels::trig`];
//! * [`kernels::rope`]: applying a rotary embedding to queries and keys.
//!
//! Kernels write their outputs once, into uninitialised memory ([`kernels::output`]), split the
//! work into row blocks that do not depend on the thread count, and run each block compiled for
//! AVX2 when the CPU has it ([`kernels::simd`]); every path gives the same bits.
//!
//! The kernels are pure Rust: slices and dimensions in, output slices out, a [`KernelError`] for
//! input they cannot accept. They never panic on user input and never see Python. The PyO3 binding
//! lives in `py` (behind the default `python` feature) and is the only code that touches Python or
//! NumPy. Parallel work runs on the crate's own thread pool ([`pool`]).

pub mod error;
pub mod kernels;
pub mod pool;

#[cfg(feature = "python")]
mod py;

pub use error::KernelError;
