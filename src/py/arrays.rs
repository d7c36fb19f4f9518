//! Borrowing NumPy arrays as slices, dispatching on dtype, creating output arrays, and running a
//! kernel on them without the GIL.
//!
//! `_core` can be called directly, so everything is checked here again even though the Python
//! wrappers normalise their inputs first: the dtype (a `TypeError` otherwise), C order and alignment
//! (a `ValueError`: the wrappers make such a copy), and the borrow.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use std::os::raw::c_int;

use numpy::npyffi::{self, npy_intp, PY_ARRAY_API};
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::KernelError;
use crate::kernels::storage::{Bf16, F16};
use crate::pool::{self, Par, Stop};
use crate::py::errors::{from_panic, to_pyerr, InternalError};

/// A float array of one of the dtypes the kernels read.
pub enum Floats<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, F16>),
    Bf16(PyReadonlyArrayDyn<'py, Bf16>),
}

/// An integer array of any width and signedness (token ids).
pub enum Ints<'py> {
    I8(PyReadonlyArrayDyn<'py, i8>),
    I16(PyReadonlyArrayDyn<'py, i16>),
    I32(PyReadonlyArrayDyn<'py, i32>),
    I64(PyReadonlyArrayDyn<'py, i64>),
    U8(PyReadonlyArrayDyn<'py, u8>),
    U16(PyReadonlyArrayDyn<'py, u16>),
    U32(PyReadonlyArrayDyn<'py, u32>),
    U64(PyReadonlyArrayDyn<'py, u64>),
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("an array of dtype {}", a.dtype()),
        Err(_) => {
            let name = obj.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string());
            format!("an object of type {name}")
        }
    }
}

fn try_as<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> Option<PyResult<PyReadonlyArrayDyn<'py, T>>> {
    let arr = obj.cast::<PyArrayDyn<T>>().ok()?;
    Some(arr.try_readonly().map_err(|e| PyValueError::new_err(format!("{arg}: {e}"))))
}

/// One specific dtype, or a `TypeError` naming `arg` and `expected`.
pub fn typed<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    expected: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    try_as(obj, arg).unwrap_or_else(|| {
        Err(PyTypeError::new_err(format!("{arg}: expected a {expected} numpy array, got {}", describe(obj))))
    })
}

pub fn floats<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Floats<'py>> {
    if let Some(a) = try_as(obj, arg) {
        return a.map(Floats::F32);
    }
    if let Some(a) = try_as(obj, arg) {
        return a.map(Floats::F64);
    }
    if let Some(a) = try_as(obj, arg) {
        return a.map(Floats::F16);
    }
    // bfloat16 only where ml_dtypes has registered it, and only an array of exactly that dtype.
    if let (Ok(arr), Some(bf16)) = (obj.cast::<PyUntypedArray>(), crate::py::half::bfloat16(obj.py())) {
        if arr.dtype().is_equiv_to(&bf16) {
            if let Some(a) = try_as(obj, arg) {
                return a.map(Floats::Bf16);
            }
        }
    }
    Err(PyTypeError::new_err(format!(
        "{arg}: expected a float32, float64, float16 or bfloat16 numpy array, got {}",
        describe(obj)
    )))
}

pub fn ints<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Ints<'py>> {
    macro_rules! attempt {
        ($($variant:ident),*) => {$(
            if let Some(a) = try_as(obj, arg) {
                return a.map(Ints::$variant);
            }
        )*};
    }
    attempt!(I64, I32, I16, I8, U64, U32, U16, U8);
    Err(PyTypeError::new_err(format!(
        "{arg}: expected a numpy array of an integer dtype (int8 to int64, uint8 to uint64), got {}",
        describe(obj)
    )))
}

/// The array's data as a slice, if it is C-contiguous and aligned.
pub fn slice<'a, T: Element>(arr: &'a PyReadonlyArrayDyn<'_, T>, arg: &str) -> PyResult<&'a [T]> {
    let not_contiguous = || {
        PyValueError::new_err(format!(
            "{arg}: _core needs a C-contiguous, aligned, native-byte-order array (the public attnkit \
             functions make one)"
        ))
    };
    if !arr.is_c_contiguous() || !arr.is_aligned() {
        return Err(not_contiguous());
    }
    arr.as_slice().map_err(|_| not_contiguous())
}

/// The data of an array whose last axis is contiguous, read in place: the elements from its first
/// to its last, and its element strides (each `>= 0`), so that a view into a bigger buffer (a KV
/// cache's first `n` positions, say) is never copied. A `ValueError` for anything else (negative
/// or unaligned strides, a strided last axis, misaligned data, another byte order); the public
/// functions copy such arrays first.
pub fn strided<'a, T: Element>(
    arr: &'a PyReadonlyArrayDyn<'_, T>,
    arg: &str,
) -> PyResult<(&'a [T], Vec<usize>)> {
    let bad = || {
        PyValueError::new_err(format!(
            "{arg}: _core needs an aligned, native-byte-order array with a contiguous last axis and \
             non-negative strides (the public attnkit functions make one)"
        ))
    };
    if !arr.is_aligned() || !arr.dtype().is_native_byteorder().unwrap_or(false) {
        return Err(bad());
    }
    let size = std::mem::size_of::<T>() as isize;
    let (shape, byte_strides) = (arr.shape(), arr.strides());
    if shape.contains(&0) {
        return Ok((&[], vec![0; shape.len()])); // nothing is read
    }
    let mut strides = Vec::with_capacity(shape.len());
    for (a, (&n, &st)) in shape.iter().zip(byte_strides).enumerate() {
        let last = a + 1 == shape.len();
        if n > 1 && (st < 0 || st % size != 0 || last && st != size) {
            return Err(bad());
        }
        strides.push(if n > 1 { (st / size) as usize } else { 0 });
    }
    // One past the last element.
    let len = 1 + shape.iter().zip(&strides).map(|(&n, &st)| (n - 1) * st).sum::<usize>();
    // SAFETY: the array (not empty) holds `len` elements from its data pointer on (its first to
    // its last element, strides non-negative), aligned, borrowed read-only for 'a.
    let data = unsafe { std::slice::from_raw_parts(arr.data() as *const T, len) };
    Ok((data, strides))
}

/// The option named `value` among `options`, or a `ValueError` naming `arg` and listing them.
pub fn choice<T: Copy>(arg: &str, value: &str, options: &[(&str, T)]) -> PyResult<T> {
    options.iter().find(|(name, _)| *name == value).map(|&(_, v)| v).ok_or_else(|| {
        let names: Vec<String> = options.iter().map(|(name, _)| format!("'{name}'")).collect();
        PyValueError::new_err(format!("{arg}: expected one of {}, got {value:?}", names.join(", ")))
    })
}

/// A shape written as NumPy writes it: `(2, 3)`, `(4,)`, `()`.
pub fn shape_str(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// A `ValueError` unless `arr` has `ndim` dimensions.
pub fn expect_ndim(shape: &[usize], ndim: usize, arg: &str, what: &str) -> PyResult<()> {
    if shape.len() == ndim {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{arg}: expected a {ndim}-d array {what}, got shape {}",
            shape_str(shape)
        )))
    }
}

thread_local! {
    /// Whether this is Python's main thread, where signal handlers run (set at import, and in a
    /// forked child for the thread that forked).
    static MAIN_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Records the calling thread as Python's main thread: the one whose kernels poll for signals.
#[pyfunction]
pub fn _set_main_thread() {
    MAIN_THREAD.set(true);
}

/// Runs a kernel with the GIL released, on the crate's pool. A kernel error becomes the contract's
/// exception; a panic becomes `InternalError` instead of a `PanicException`.
///
/// On Python's main thread the kernel polls for signals every 20-100 ms ([`Stop`]): when a
/// handler raises (Ctrl-C's `KeyboardInterrupt`), the work stops and that exception is raised
/// instead of a result.
pub fn run<R: Send>(
    py: Python<'_>,
    index_shape: &[usize],
    kernel: impl FnOnce(Par<'_>) -> Result<R, KernelError> + Send,
) -> PyResult<R> {
    // The pool is looked up while this thread holds the GIL, so no other thread can hold the
    // pool's lock when `os.fork()` (which holds the GIL) copies the process: a child forked while
    // another thread is inside a kernel finds the lock free.
    let pool = pool::current();
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let poll = || {
        let checked = Python::attach(|py| py.check_signals());
        checked.map_err(|err| *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(err)).is_err()
    };
    let stop = MAIN_THREAD.get().then(|| Stop::new(&poll));
    let result =
        py.detach(|| catch_unwind(AssertUnwindSafe(|| kernel(Par::new(pool.as_deref(), stop.as_ref())))));
    if stop.as_ref().is_some_and(Stop::was_requested) {
        let err = raised.into_inner().unwrap_or_else(|p| p.into_inner());
        return Err(
            err.unwrap_or_else(|| InternalError::new_err("attnkit bug: a call stopped without a signal"))
        );
    }
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_pyerr(err, index_shape)),
        Err(payload) => Err(from_panic(payload)),
    }
}

/// A fresh, uninitialised, C-ordered NumPy array of `shape`, or a `MemoryError` that names the
/// output (`what`: the output and the arguments that set its size) when it cannot be made.
///
/// Made by NumPy's C API (`PyArray_NewFromDescr`, as `numpy.empty` is), so outputs get NumPy's
/// allocator: huge pages for big arrays (a 100 MB output otherwise costs 25,000 page faults, more
/// than the kernel itself) and NumPy's memory tracing; nothing a user can replace from Python sits
/// in between. The array is checked before any kernel writes to it all the same.
fn empty<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
    what: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let dtype = numpy::dtype::<T>(py);
    let cannot = |why: String| {
        PyMemoryError::new_err(format!(
            "{what}: cannot allocate an array of shape {} and dtype {dtype} ({why})",
            shape_str(shape)
        ))
    };
    let limit = isize::MAX as usize;
    let bytes = crate::error::product(shape).and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
    let (Some(bytes), true) = (bytes.filter(|&b| b <= limit), shape.iter().all(|&d| d <= limit)) else {
        return Err(cannot("more bytes than memory can address".into()));
    };
    let mut dims: Vec<npy_intp> = shape.iter().map(|&d| d as npy_intp).collect();
    let ndim = c_int::try_from(dims.len()).map_err(|_| cannot("too many dimensions".into()))?;
    // SAFETY: the arguments are what PyArray_NewFromDescr documents: NumPy's array type, a
    // reference to the descriptor that it steals, `ndim` dimensions each at most isize::MAX
    // (checked above) whose product in bytes fits isize, and null strides, data and object, so
    // that NumPy allocates a C-ordered buffer itself. The thread holds the GIL (`py`).
    let ptr = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            dtype.clone().into_dtype_ptr(),
            ndim,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    // SAFETY: `ptr` is a new reference to an array, or null with an exception set.
    let arr = unsafe { Bound::from_owned_ptr_or_err(py, ptr) }.map_err(|err| {
        if err.is_instance_of::<PyMemoryError>(py) {
            cannot(format!("{bytes} bytes"))
        } else {
            err
        }
    })?;
    let arr = arr.cast_into::<PyArrayDyn<T>>()?;
    // SAFETY: reads the flags field of the array object just made, which is alive (`arr`).
    let writeable = unsafe { (*arr.as_array_ptr()).fields.flags } & npyffi::NPY_ARRAY_WRITEABLE != 0;
    if arr.shape() != shape || !arr.is_c_contiguous() || !arr.is_aligned() || !writeable {
        return Err(InternalError::new_err(format!(
            "attnkit bug: NumPy returned an unusable output array for {what} (shape {} for {}, C order {}, \
             aligned {}, writeable {writeable})",
            shape_str(arr.shape()),
            shape_str(shape),
            arr.is_c_contiguous(),
            arr.is_aligned(),
        )));
    }
    Ok(arr)
}

/// A fresh NumPy array of `shape` and its elements, for a kernel to write; `what` names it (and
/// the arguments that set its size) in the error when it cannot be made. The only place that
/// hands out an array's memory: the caller must have a kernel write every element before the
/// array is used, and must not touch the array otherwise while the slice is in use.
pub fn empty_uninit<'py, 'a, T: Element>(
    py: Python<'py>,
    shape: &[usize],
    what: &str,
) -> PyResult<(Bound<'py, PyAny>, &'a mut [MaybeUninit<T>])> {
    let arr = empty::<T>(py, shape, what)?;
    let n = arr.len();
    let data: &mut [MaybeUninit<T>] = if n == 0 {
        &mut []
    } else {
        // SAFETY: `empty` has just made, and checked, a writeable C-contiguous array aligned for
        // T with n elements, which nothing else references yet; MaybeUninit makes no claim about
        // the contents, and the caller's contract keeps the slice the only access until the
        // kernel has written them.
        unsafe { std::slice::from_raw_parts_mut(arr.data().cast::<MaybeUninit<T>>(), n) }
    };
    Ok((arr.into_any(), data))
}

/// Creates a NumPy array of `shape` and lets `kernel` write all its elements, without the GIL.
pub fn fill_new<'py, T: Element + Send>(
    py: Python<'py>,
    shape: &[usize],
    what: &str,
    index_shape: &[usize],
    kernel: impl FnOnce(&mut [MaybeUninit<T>], Par<'_>) -> Result<(), KernelError> + Send,
) -> PyResult<Bound<'py, PyAny>> {
    let (out, data) = empty_uninit::<T>(py, shape, what)?;
    run(py, index_shape, |par| kernel(data, par))?;
    Ok(out)
}

/// An output array, the borrow that reserves it for a kernel (the caller's array) and its elements.
pub type Output<'py, 'a, T> =
    (Bound<'py, PyAny>, Option<PyReadwriteArrayDyn<'py, T>>, &'a mut [MaybeUninit<T>]);

/// The array a kernel writes: the caller's `out` when given, else a new one (`arg` names it, and
/// `what` the arguments that set its shape, in a `MemoryError`). `out` must be a writeable,
/// C-contiguous, aligned array of `T` and `shape` that shares no memory with the inputs or the
/// other outputs, which are borrowed by then: a `TypeError` or `ValueError` naming `arg`
/// otherwise. Returns the array, the borrow that reserves `out` for the kernel (hold it until the
/// kernel has run), and the elements, which the caller must have a kernel write, all of them,
/// before the array is used.
pub fn output<'py, 'a, T: Element>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    arg: &str,
    shape: &[usize],
    what: &str,
) -> PyResult<Output<'py, 'a, T>> {
    let Some(out) = out.filter(|o| !o.is_none()) else {
        let (array, data) = empty_uninit::<T>(py, shape, &format!("{arg} ({what})"))?;
        return Ok((array, None, data));
    };
    let arr = out.cast::<PyArrayDyn<T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg}: expected a numpy array of dtype {}, got {}",
            numpy::dtype::<T>(py),
            describe(out)
        ))
    })?;
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected shape {} ({what}), got {}",
            shape_str(shape),
            shape_str(arr.shape())
        )));
    }
    // The inputs (and any other output) are borrowed by now: an overlapping `out` fails here.
    let mut rw = arr.try_readwrite().map_err(|err| {
        PyValueError::new_err(match err {
            numpy::BorrowError::AlreadyBorrowed => {
                format!("{arg}: shares memory with an input or another output")
            }
            numpy::BorrowError::NotWriteable => format!("{arg}: the array is read-only"),
            other => format!("{arg}: {other}"),
        })
    })?;
    let contiguous = rw.is_c_contiguous() && rw.is_aligned();
    let (ptr, len) = match rw.as_slice_mut() {
        Ok(data) if contiguous => (data.as_mut_ptr(), data.len()),
        _ => return Err(PyValueError::new_err(format!("{arg}: expected a C-contiguous, aligned array"))),
    };
    // SAFETY: the `len` elements from `ptr` are the C-contiguous, aligned data of `out`, borrowed
    // for writing by `rw`, which the caller holds while the slice is in use; MaybeUninit<T> has
    // T's layout, and the kernels only ever store initialised values, so the elements stay valid.
    let data = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<T>>(), len) };
    Ok((out.clone(), Some(rw), data))
}

/// [`fill_new`] into the caller's array `out` when given (see [`output`]); returns the array
/// written.
pub fn fill_into<'py, T: Element + Send>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
    what: &str,
    index_shape: &[usize],
    kernel: impl FnOnce(&mut [MaybeUninit<T>], Par<'_>) -> Result<(), KernelError> + Send,
) -> PyResult<Bound<'py, PyAny>> {
    let (array, borrow, data) = output::<T>(py, out, "out", shape, what)?;
    run(py, index_shape, |par| kernel(data, par))?;
    drop(borrow);
    Ok(array)
}

/// [`fill_new`] for a kernel with two outputs of the same shape.
pub fn fill_new_pair<'py, T: Element + Send>(
    py: Python<'py>,
    shape: &[usize],
    what: [&str; 2],
    kernel: impl FnOnce(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>], Par<'_>) -> Result<(), KernelError> + Send,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (a, da) = empty_uninit::<T>(py, shape, what[0])?;
    let (b, db) = empty_uninit::<T>(py, shape, what[1])?;
    run(py, &[], |par| kernel(da, db, par))?;
    Ok((a, b))
}

/// Runs `$body` with `$a` bound to the borrowed array of whichever integer dtype `$ints` holds.
macro_rules! with_ints {
    ($ints:expr, $a:ident => $body:expr) => {
        match $ints {
            Ints::I8($a) => $body,
            Ints::I16($a) => $body,
            Ints::I32($a) => $body,
            Ints::I64($a) => $body,
            Ints::U8($a) => $body,
            Ints::U16($a) => $body,
            Ints::U32($a) => $body,
            Ints::U64($a) => $body,
        }
    };
}
pub(crate) use with_ints;
