//! The PyO3 binding: the only code that touches Python or NumPy. It converts arrays, dispatches on
//! dtype, releases the GIL around every kernel, and maps kernel errors onto Python exceptions.

mod arrays;
mod attention;
mod block;
mod embedding;
mod errors;
mod half;
mod linear;
mod positional;
mod rope;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyInt;

/// Sets the number of threads attnkit's kernels use (1 to `MAX_THREADS`).
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    let count = match n.extract::<i64>() {
        Ok(count) => count,
        Err(_) if n.is_instance_of::<PyInt>() => i64::MAX, // beyond i64: too many either way
        Err(_) => {
            return Err(PyTypeError::new_err(format!("n: expected an int, got {}", n.get_type().name()?)))
        }
    };
    match usize::try_from(count) {
        Ok(count) if (1..=crate::pool::MAX_THREADS).contains(&count) => {
            crate::pool::set_num_threads(count);
            Ok(())
        }
        _ => Err(PyValueError::new_err(format!(
            "n: expected a number of threads from 1 to {}, got {n}",
            crate::pool::MAX_THREADS
        ))),
    }
}

/// The number of threads attnkit's kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::pool::num_threads()
}

/// Allows (the default) or forbids the AVX2 code paths, and the AVX-512 ones alone; for tests,
/// since every path gives the same bits.
#[pyfunction]
#[pyo3(signature = (enabled, avx512=true))]
fn _set_simd_enabled(enabled: bool, avx512: bool) {
    crate::kernels::simd::set_enabled(enabled);
    crate::kernels::simd::set_avx512_enabled(avx512);
}

/// Whether the kernels run their AVX2 code paths on this CPU.
#[pyfunction]
fn _simd_accelerated() -> bool {
    crate::kernels::simd::accelerated()
}

/// Whether attention's float32 matrix products run their AVX-512 kernels on this CPU.
#[pyfunction]
fn _simd_avx512() -> bool {
    crate::kernels::simd::avx512()
}

/// Whether `Bf16Linear`'s products run the `vdpbf16ps` tiles on this CPU (else the portable
/// emulation of the instruction: the same bits, about ten times slower than float32 BLAS).
#[pyfunction]
fn _simd_bf16() -> bool {
    crate::kernels::linear::native()
}

/// One core's peak GFLOP/s of float32 multiply-adds or (`bf16`) of `vdpbf16ps`, measured by a
/// loop in registers; `None` where the CPU lacks the instruction. For the benchmark.
#[pyfunction]
#[pyo3(signature = (bf16=false))]
fn _peak_gflops(py: Python<'_>, bf16: bool) -> Option<f64> {
    py.detach(|| crate::kernels::peak::peak_flops(bf16).map(|f| f / 1e9))
}

/// The module declares that it needs the GIL (`gil_used = true`; PyO3's default is the opposite):
/// a process may fork at any moment because the pool's lock is only taken with the GIL held, so a
/// free-threaded interpreter must re-enable the GIL for it (it does, and warns).
#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_THREADS", crate::pool::MAX_THREADS)?;
    m.add("InternalError", m.py().get_type::<errors::InternalError>())?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_set_simd_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(_simd_accelerated, m)?)?;
    m.add_function(wrap_pyfunction!(_simd_avx512, m)?)?;
    m.add_function(wrap_pyfunction!(_simd_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(_peak_gflops, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::_set_main_thread, m)?)?;
    m.add_function(wrap_pyfunction!(attention::merge_attention, m)?)?;
    m.add_function(wrap_pyfunction!(embedding::embedding, m)?)?;
    m.add_function(wrap_pyfunction!(embedding::embedding_bag, m)?)?;
    m.add_function(wrap_pyfunction!(positional::sinusoidal, m)?)?;
    m.add_function(wrap_pyfunction!(positional::rope_cos_sin, m)?)?;
    m.add_function(wrap_pyfunction!(rope::apply_rope, m)?)?;
    m.add_function(wrap_pyfunction!(attention::attention, m)?)?;
    m.add_function(wrap_pyfunction!(block::norm, m)?)?;
    m.add_function(wrap_pyfunction!(block::gelu, m)?)?;
    m.add_function(wrap_pyfunction!(block::silu_mul, m)?)?;
    m.add_function(wrap_pyfunction!(linear::pack_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(linear::pack_f32, m)?)?;
    m.add_function(wrap_pyfunction!(linear::linear_f32, m)?)?;
    Ok(())
}
