//! qpeft's CPU kernels and their Python bindings.
//!
//! The kernel modules are plain Rust with their own unit tests. This file is
//! the only one that touches PyO3: it converts NumPy views of torch tensors to
//! slices, releases the GIL around each kernel, and maps [`error::Error`] (and
//! any panic) to a Python exception. Python validates user input first
//! (python/qpeft/functional.py); the checks here only guard memory.

pub mod adamw;
pub mod adamw8;
pub mod attn_grad;
pub mod attn_softmax;
pub mod blockwise8;
pub mod codebook;
pub mod cpu;
pub mod decade_code;
pub mod dynamic_map;
pub mod elem;
pub mod error;
#[cfg(test)]
mod fuzz_boundary;
pub mod gemv;
pub mod lora_up;
pub mod memory;
pub mod nf4;
pub mod paged_adamw;
pub mod pages;
pub mod parallel;
pub mod rmsnorm;
pub mod scale;
pub mod swiglu;
pub mod xent;

#[cfg(feature = "python")]
mod bindings {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use numpy::{PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1};
    use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
    use pyo3::prelude::*;

    use crate::blockwise8::{self, Code8};
    use crate::codebook::{QuantType, FP4, NF4};
    use crate::cpu::{self, Isa};
    use crate::dynamic_map::{dynamic_signed, dynamic_unsigned};
    use crate::elem::{Bf16, Bf16InF32, Elem, F16, F16InF32};
    use crate::error::Error;
    use crate::nf4::{self, Nested, Scales};

    fn to_py(e: Error) -> PyErr {
        match e {
            Error::Storage(msg) => PyOSError::new_err(msg),
            e => PyValueError::new_err(e.to_string()),
        }
    }

    /// Run a kernel with the GIL released; a panic becomes RuntimeError.
    fn run<R: Send>(py: Python<'_>, f: impl FnOnce() -> Result<R, Error> + Send) -> PyResult<R> {
        let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
        match out {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(to_py(e)),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(PyRuntimeError::new_err(format!(
                    "internal error in qpeft's native kernel (please report it): {msg}"
                )))
            }
        }
    }

    fn parse_isa(isa: Option<&str>) -> PyResult<Isa> {
        match isa {
            None => Ok(cpu::best()),
            Some("scalar") => Ok(Isa::Scalar),
            Some("avx2") => Ok(Isa::Avx2),
            Some("avx512") => Ok(Isa::Avx512),
            Some("neon") => Ok(Isa::Neon),
            Some(other) => Err(PyValueError::new_err(format!(
                "isa must be 'scalar', 'neon', 'avx2' or 'avx512', got {other:?}"
            ))),
        }
    }

    fn parse_quant_type(name: &str) -> PyResult<QuantType> {
        QuantType::parse(name).ok_or_else(|| {
            PyValueError::new_err(format!("quant_type must be 'nf4' or 'fp4', got {name:?}"))
        })
    }

    fn code256(values: &[f32]) -> PyResult<[f32; 256]> {
        values.try_into().map_err(|_| {
            PyValueError::new_err(format!("an 8-bit code needs 256 values, got {}", values.len()))
        })
    }

    /// NumPy can view a buffer at any byte offset (`np.frombuffer(b, offset=1)`);
    /// a Rust slice must be aligned to its element type, so check before making one.
    fn check_aligned<T>(ptr: *const T, what: &str) -> PyResult<()> {
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PyValueError::new_err(format!(
                "{what} is not aligned to its element size ({} bytes); pass a copy (np.ascontiguousarray / tensor.clone())",
                std::mem::align_of::<T>()
            )));
        }
        Ok(())
    }

    fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
        check_aligned(a.data() as *const T, what)?;
        a.as_slice()
            .map_err(|_| PyValueError::new_err(format!("{what} must be contiguous")))
    }

    fn slice_mut<'a, T: numpy::Element>(
        a: &'a mut PyReadwriteArray1<'_, T>,
        what: &str,
    ) -> PyResult<&'a mut [T]> {
        check_aligned(a.data() as *const T, what)?;
        a.as_slice_mut()
            .map_err(|_| PyValueError::new_err(format!("{what} must be contiguous")))
    }

    /// A flat float input: float32, or float16 / bfloat16 passed as int16 bits.
    enum In<'py> {
        F32(PyReadonlyArray1<'py, f32>),
        Bits(PyReadonlyArray1<'py, i16>, bool), // true: bfloat16
    }

    fn input<'py>(x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<In<'py>> {
        match dtype {
            "float32" => Ok(In::F32(x.extract()?)),
            "float16" | "bfloat16" => Ok(In::Bits(x.extract()?, dtype == "bfloat16")),
            other => Err(PyTypeError::new_err(format!(
                "dtype must be float32, float16 or bfloat16, got {other}"
            ))),
        }
    }

    enum Out<'py> {
        F32(PyReadwriteArray1<'py, f32>),
        Bits(PyReadwriteArray1<'py, i16>, bool),
    }

    fn output<'py>(x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Out<'py>> {
        match dtype {
            "float32" => Ok(Out::F32(x.extract()?)),
            "float16" | "bfloat16" => Ok(Out::Bits(x.extract()?, dtype == "bfloat16")),
            other => Err(PyTypeError::new_err(format!(
                "dtype must be float32, float16 or bfloat16, got {other}"
            ))),
        }
    }

    fn as_elems<E: Elem>(bits: &[i16]) -> &[E] {
        // SAFETY: Bf16 and F16 are repr(transparent) over u16, the same size
        // and alignment as i16; the length is unchanged.
        unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const E, bits.len()) }
    }

    /// float32 storage as a float32 wrapper type ([`Bf16InF32`], [`F16InF32`]).
    fn as_f32_wrappers<E: Elem>(x: &mut [f32]) -> &mut [E] {
        assert_eq!(std::mem::size_of::<E>(), 4);
        // SAFETY: the wrappers are repr(transparent) over f32 (size checked);
        // the length is unchanged and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut E, x.len()) }
    }

    fn as_elems_mut<E: Elem>(bits: &mut [i16]) -> &mut [E] {
        // SAFETY: as in `as_elems`; the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(bits.as_mut_ptr() as *mut E, bits.len()) }
    }

    /// Calls `$body` with `$x` bound to the input as a slice of its element type.
    macro_rules! with_input {
        ($inp:expr, $x:ident => $body:expr) => {
            match &$inp {
                In::F32(a) => {
                    let $x: &[f32] = slice(a, "input")?;
                    $body
                }
                In::Bits(a, true) => {
                    let $x: &[Bf16] = as_elems(slice(a, "input")?);
                    $body
                }
                In::Bits(a, false) => {
                    let $x: &[F16] = as_elems(slice(a, "input")?);
                    $body
                }
            }
        };
    }

    macro_rules! with_output {
        ($outp:expr, $o:ident => $body:expr) => {
            match &mut $outp {
                Out::F32(a) => {
                    let $o: &mut [f32] = slice_mut(a, "output")?;
                    $body
                }
                Out::Bits(a, true) => {
                    let $o: &mut [Bf16] = as_elems_mut(slice_mut(a, "output")?);
                    $body
                }
                Out::Bits(a, false) => {
                    let $o: &mut [F16] = as_elems_mut(slice_mut(a, "output")?);
                    $body
                }
            }
        };
    }

    /// Block scales from the optional arguments of the 4-bit bindings: plain
    /// `absmax`, or the nested triple (its 256-entry code copied into `code`).
    fn scales<'a>(
        absmax: &'a Option<PyReadonlyArray1<'_, f32>>,
        qabsmax: &'a Option<PyReadonlyArray1<'_, u8>>,
        absmax2: &'a Option<PyReadonlyArray1<'_, f32>>,
        code2: &Option<PyReadonlyArray1<'_, f32>>,
        offset: f32,
        blocksize2: usize,
        code: &'a mut [f32; 256],
    ) -> PyResult<Scales<'a>> {
        match (absmax, qabsmax, absmax2, code2) {
            (Some(a), None, None, None) => Ok(Scales::Plain(slice(a, "absmax")?)),
            (None, Some(q), Some(a2), Some(c)) => {
                *code = code256(slice(c, "nested code")?)?;
                Ok(Scales::Nested(Nested {
                    qabsmax: slice(q, "nested codes")?,
                    absmax2: slice(a2, "nested absmax")?,
                    code,
                    offset,
                    blocksize2,
                }))
            }
            _ => Err(PyValueError::new_err("pass either absmax, or all of qabsmax, absmax2 and code2")),
        }
    }

    /// The instruction set the kernels use on this CPU.
    #[pyfunction]
    fn cpu_isa() -> &'static str {
        cpu::best().name()
    }

    /// Whether the 4-bit matmul multiplies bfloat16 inputs of 2 or more tokens
    /// with AVX512-BF16 dot products (weights rounded to bfloat16) on this CPU.
    #[pyfunction]
    fn cpu_has_bf16_dot() -> bool {
        cpu::has_bf16_dot()
    }

    /// The 16 values of a 4-bit code book ('nf4' or 'fp4') by code.
    #[pyfunction]
    fn code_4bit(quant_type: &str) -> PyResult<Vec<f32>> {
        Ok(match parse_quant_type(quant_type)? {
            QuantType::Nf4 => NF4.to_vec(),
            QuantType::Fp4 => FP4.to_vec(),
        })
    }

    /// bitsandbytes' 8-bit dynamic map (256 ascending values).
    #[pyfunction]
    fn dynamic_map(signed: bool) -> Vec<f32> {
        if signed {
            dynamic_signed().to_vec()
        } else {
            dynamic_unsigned().to_vec()
        }
    }

    #[pyfunction]
    #[pyo3(signature = (x, dtype, quant_type, blocksize, packed, absmax, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn quantize_4bit(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        dtype: &str,
        quant_type: &str,
        blocksize: usize,
        mut packed: PyReadwriteArray1<'_, u8>,
        mut absmax: PyReadwriteArray1<'_, f32>,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        let qt = parse_quant_type(quant_type)?;
        let isa = parse_isa(isa)?;
        let inp = input(x, dtype)?;
        let packed = slice_mut(&mut packed, "packed")?;
        let absmax = slice_mut(&mut absmax, "absmax")?;
        with_input!(inp, xs => run(py, || {
            nf4::quantize_4bit_isa(isa, xs, qt, blocksize, packed, absmax, threads)
        }))
    }

    #[pyfunction]
    #[pyo3(signature = (packed, quant_type, blocksize, out, dtype, threads, absmax=None,
                        qabsmax=None, absmax2=None, code2=None, offset=0.0, blocksize2=256, isa=None,
                        round_to=None, cols=None, stride=None))]
    #[allow(clippy::too_many_arguments)]
    fn dequantize_4bit(
        py: Python<'_>,
        packed: PyReadonlyArray1<'_, u8>,
        quant_type: &str,
        blocksize: usize,
        out: &Bound<'_, PyAny>,
        dtype: &str,
        threads: usize,
        absmax: Option<PyReadonlyArray1<'_, f32>>,
        qabsmax: Option<PyReadonlyArray1<'_, u8>>,
        absmax2: Option<PyReadonlyArray1<'_, f32>>,
        code2: Option<PyReadonlyArray1<'_, f32>>,
        offset: f32,
        blocksize2: usize,
        isa: Option<&str>,
        round_to: Option<&str>,
        cols: Option<usize>,
        stride: Option<usize>,
    ) -> PyResult<()> {
        let qt = parse_quant_type(quant_type)?;
        let isa = parse_isa(isa)?;
        let packed = slice(&packed, "packed")?;
        let rows = match (cols, stride) {
            (None, None) => None,
            (Some(c), Some(s)) => Some((c, s)),
            _ => return Err(PyValueError::new_err("give both cols and stride (rows into a wider matrix), or neither")),
        };
        let mut code = [0.0f32; 256];
        let scales = scales(&absmax, &qabsmax, &absmax2, &code2, offset, blocksize2, &mut code)?;
        let mut outp = output(out, dtype)?;
        // The whole output, or each row's first `cols` elements of `stride`.
        #[allow(clippy::too_many_arguments)]
        fn go<T: Elem>(isa: Isa, packed: &[u8], scales: Scales, qt: QuantType, bs: usize, o: &mut [T], threads: usize,
                       rows: Option<(usize, usize)>) -> Result<(), Error> {
            match rows {
                None => nf4::dequantize_4bit_isa(isa, packed, scales, qt, bs, o, threads),
                Some((c, s)) => nf4::dequantize_4bit_rows_isa(isa, packed, scales, qt, bs, c, s, o, threads),
            }
        }
        match (round_to, &mut outp) {
            (None, _) => with_output!(outp, o => run(py, || go(isa, packed, scales, qt, blocksize, o, threads, rows))),
            (Some("bfloat16"), Out::F32(a)) => {
                let o: &mut [Bf16InF32] = as_f32_wrappers(slice_mut(a, "output")?);
                run(py, || go(isa, packed, scales, qt, blocksize, o, threads, rows))
            }
            (Some("float16"), Out::F32(a)) => {
                let o: &mut [F16InF32] = as_f32_wrappers(slice_mut(a, "output")?);
                run(py, || go(isa, packed, scales, qt, blocksize, o, threads, rows))
            }
            (Some(r), _) => Err(PyValueError::new_err(format!(
                "round_to must be 'bfloat16' or 'float16' with a float32 output, got round_to={r:?} and dtype={dtype:?}"
            ))),
        }
    }

    #[pyfunction]
    #[pyo3(signature = (x, dtype, code, blocksize, out, absmax, threads, offset=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn quantize_blockwise(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        dtype: &str,
        code: PyReadonlyArray1<'_, f32>,
        blocksize: usize,
        mut out: PyReadwriteArray1<'_, u8>,
        mut absmax: PyReadwriteArray1<'_, f32>,
        threads: usize,
        offset: f32,
    ) -> PyResult<()> {
        let code = Code8::new(code256(slice(&code, "code")?)?).map_err(to_py)?;
        let inp = input(x, dtype)?;
        let out = slice_mut(&mut out, "out")?;
        let absmax = slice_mut(&mut absmax, "absmax")?;
        with_input!(inp, xs => run(py, || {
            blockwise8::quantize_blockwise(xs, offset, &code, blocksize, out, absmax, threads)
        }))
    }

    #[pyfunction]
    #[pyo3(signature = (q, absmax, code, blocksize, out, dtype, threads, offset=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn dequantize_blockwise(
        py: Python<'_>,
        q: PyReadonlyArray1<'_, u8>,
        absmax: PyReadonlyArray1<'_, f32>,
        code: PyReadonlyArray1<'_, f32>,
        blocksize: usize,
        out: &Bound<'_, PyAny>,
        dtype: &str,
        threads: usize,
        offset: f32,
    ) -> PyResult<()> {
        let code = code256(slice(&code, "code")?)?;
        let q = slice(&q, "codes")?;
        let absmax = slice(&absmax, "absmax")?;
        let mut outp = output(out, dtype)?;
        with_output!(outp, o => run(py, || {
            blockwise8::dequantize_blockwise(q, absmax, offset, &code, blocksize, o, threads)
        }))
    }

    /// A 4-bit weight's buffers, checked once, for many calls of
    /// [`Gemv4Weight::run`] (`functional._gemv_4bit` keeps one per weight while
    /// its tensors stay the same). At decode a call multiplies a few hundred
    /// thousand weights in tens of microseconds, so converting and checking
    /// eight arguments on every call costs as much as the product.
    ///
    /// It holds the NumPy arrays it was made from (so their memory lives as
    /// long as it does) and their addresses; it copies nothing.
    #[pyclass(module = "qpeft._native", frozen)]
    struct Gemv4Weight {
        packed: (usize, usize),
        scales: RawScales,
        quant_type: QuantType,
        blocksize: usize,
        n: usize,
        k: usize,
        _keep: Vec<Py<PyAny>>,
    }

    /// [`Scales`] as addresses and lengths (slices cannot live in a pyclass).
    enum RawScales {
        Plain((usize, usize)),
        Nested { qabsmax: (usize, usize), absmax2: (usize, usize), code: Box<[f32; 256]>, offset: f32, blocksize2: usize },
    }

    fn raw<T>(s: &[T]) -> (usize, usize) {
        (s.as_ptr() as usize, s.len())
    }

    /// # Safety
    /// `(addr, len)` came from [`raw`] on memory that is still alive.
    unsafe fn unraw<'a, T>((addr, len): (usize, usize)) -> &'a [T] {
        std::slice::from_raw_parts(addr as *const T, len)
    }

    impl Gemv4Weight {
        fn weight(&self) -> crate::gemv::Weight4<'_> {
            // SAFETY: every address is of an array in `_keep`, which lives as long as self.
            let scales = unsafe {
                match &self.scales {
                    RawScales::Plain(a) => Scales::Plain(unraw(*a)),
                    RawScales::Nested { qabsmax, absmax2, code, offset, blocksize2 } => Scales::Nested(Nested {
                        qabsmax: unraw(*qabsmax),
                        absmax2: unraw(*absmax2),
                        code,
                        offset: *offset,
                        blocksize2: *blocksize2,
                    }),
                }
            };
            crate::gemv::Weight4 {
                packed: unsafe { unraw(self.packed) },
                scales,
                quant_type: self.quant_type,
                blocksize: self.blocksize,
                n: self.n,
                k: self.k,
            }
        }
    }

    /// Check an address from Python (`tensor.data_ptr()`) for `len` elements
    /// of `T`: refuse null and misaligned ones (an empty buffer may be null).
    fn check_addr<T>(addr: usize, len: usize, what: &str) -> PyResult<()> {
        if len > 0 && (addr == 0 || !addr.is_multiple_of(std::mem::align_of::<T>())) {
            return Err(PyValueError::new_err(format!("{what} address {addr:#x} is null or misaligned")));
        }
        Ok(())
    }

    /// The input buffer at a checked address, shared (other threads may read it too).
    ///
    /// # Safety
    /// The caller vouches that `len` elements of `T` live at `addr` for `'a`.
    unsafe fn input_at<'a, T>(addr: usize, len: usize) -> PyResult<&'a [T]> {
        check_addr::<T>(addr, len, "input")?;
        Ok(if len == 0 { &[] } else { std::slice::from_raw_parts(addr as *const T, len) })
    }

    /// The output buffer at a checked address, written by this call alone.
    ///
    /// # Safety
    /// As [`input_at`], and nothing else touches the buffer during the call.
    unsafe fn output_at<'a, T>(addr: usize, len: usize) -> PyResult<&'a mut [T]> {
        check_addr::<T>(addr, len, "output")?;
        Ok(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(addr as *mut T, len) })
    }

    #[pymethods]
    impl Gemv4Weight {
        #[new]
        #[pyo3(signature = (packed, quant_type, blocksize, n, k, absmax=None, qabsmax=None, absmax2=None, code2=None,
                            offset=0.0, blocksize2=256))]
        #[allow(clippy::too_many_arguments)]
        fn new(
            packed: PyReadonlyArray1<'_, u8>,
            quant_type: &str,
            blocksize: usize,
            n: usize,
            k: usize,
            absmax: Option<PyReadonlyArray1<'_, f32>>,
            qabsmax: Option<PyReadonlyArray1<'_, u8>>,
            absmax2: Option<PyReadonlyArray1<'_, f32>>,
            code2: Option<PyReadonlyArray1<'_, f32>>,
            offset: f32,
            blocksize2: usize,
        ) -> PyResult<Self> {
            let quant_type = parse_quant_type(quant_type)?;
            let mut code = [0.0f32; 256];
            let s = scales(&absmax, &qabsmax, &absmax2, &code2, offset, blocksize2, &mut code)?;
            let p = slice(&packed, "packed")?;
            let w = crate::gemv::Weight4 { packed: p, scales: s, quant_type, blocksize, n, k };
            // The weight's half of gemv's checks, once (each call repeats them; they are cheap).
            crate::gemv::check_weight(&w).map_err(to_py)?;
            let scales = match s {
                Scales::Plain(a) => RawScales::Plain(raw(a)),
                Scales::Nested(ns) => RawScales::Nested {
                    qabsmax: raw(ns.qabsmax),
                    absmax2: raw(ns.absmax2),
                    code: Box::new(code),
                    offset,
                    blocksize2,
                },
            };
            let packed_raw = raw(p);
            let mut keep = vec![packed.as_any().clone().unbind()];
            keep.extend([absmax.map(|a| a.as_any().clone().unbind()), qabsmax.map(|a| a.as_any().clone().unbind()),
                         absmax2.map(|a| a.as_any().clone().unbind())].into_iter().flatten());
            Ok(Gemv4Weight { packed: packed_raw, scales, quant_type, blocksize, n, k, _keep: keep })
        }

        /// y = x @ W.T for `tokens` rows: x (tokens x K) and out (tokens x N)
        /// are given by address, contiguous, of type `dtype`, not overlapping.
        /// Internal: `functional._gemv_4bit` passes the `data_ptr()` of CPU
        /// tensors it has just checked; anything else is undefined behaviour.
        #[pyo3(signature = (x, out, dtype, tokens, threads, isa=None))]
        #[allow(clippy::too_many_arguments)]
        fn run(
            &self,
            py: Python<'_>,
            x: usize,
            out: usize,
            dtype: &str,
            tokens: usize,
            threads: usize,
            isa: Option<&str>,
        ) -> PyResult<()> {
            use crate::gemv;
            let isa = parse_isa(isa)?;
            let w = self.weight();
            let too_big = || PyValueError::new_err(format!("{tokens} tokens of this weight overflow memory"));
            let x_len = tokens.checked_mul(self.k).ok_or_else(too_big)?;
            let y_len = tokens.checked_mul(self.n).ok_or_else(too_big)?;
            let size = match dtype {
                "float32" => 4,
                "float16" | "bfloat16" => 2,
                other => {
                    return Err(PyTypeError::new_err(format!("dtype must be float32, float16 or bfloat16, got {other}")))
                }
            };
            // Each buffer must fit in the address space (a slice may span at most isize::MAX bytes).
            let end = |addr: usize, len: usize| {
                len.checked_mul(size)
                    .filter(|&b| b <= isize::MAX as usize)
                    .and_then(|b| addr.checked_add(b))
                    .ok_or_else(too_big)
            };
            let (x_end, y_end) = (end(x, x_len)?, end(out, y_len)?);
            if x_len > 0 && y_len > 0 && x < y_end && out < x_end {
                return Err(PyValueError::new_err("the input and the output overlap; pass a separate output"));
            }
            // SAFETY: the caller vouches for both buffers (see the docstring); they do not overlap.
            unsafe {
                match dtype {
                    "float32" => {
                        let (xs, o) = (input_at::<f32>(x, x_len)?, output_at::<f32>(out, y_len)?);
                        run(py, || gemv::gemv_4bit_isa(isa, &w, xs, tokens, o, threads))
                    }
                    "bfloat16" => {
                        let (xs, o) = (input_at::<Bf16>(x, x_len)?, output_at::<Bf16>(out, y_len)?);
                        run(py, || gemv::gemv_4bit_isa(isa, &w, xs, tokens, o, threads))
                    }
                    _ => {
                        let (xs, o) = (input_at::<F16>(x, x_len)?, output_at::<F16>(out, y_len)?);
                        run(py, || gemv::gemv_4bit_isa(isa, &w, xs, tokens, o, threads))
                    }
                }
            }
        }

        /// (N, K): the weight's shape.
        #[getter]
        fn shape(&self) -> (usize, usize) {
            (self.n, self.k)
        }
    }

    /// An element type as NumPy holds it: float32 as is, 16-bit floats as int16 bits.
    trait FromNumpy: Elem {
        type Raw: numpy::Element;
    }
    impl FromNumpy for f32 {
        type Raw = f32;
    }
    impl FromNumpy for Bf16 {
        type Raw = i16;
    }
    impl FromNumpy for F16 {
        type Raw = i16;
    }

    fn read<'py, E: FromNumpy>(x: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray1<'py, E::Raw>> {
        x.extract()
    }

    fn write<'py, E: FromNumpy>(x: &Bound<'py, PyAny>) -> PyResult<PyReadwriteArray1<'py, E::Raw>> {
        x.extract()
    }

    fn elems<'a, E: FromNumpy>(a: &'a PyReadonlyArray1<'_, E::Raw>, what: &str) -> PyResult<&'a [E]> {
        let s = slice(a, what)?;
        // SAFETY: E is f32 over f32, or a repr(transparent) u16 over i16: same size and alignment.
        Ok(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const E, s.len()) })
    }

    fn elems_mut<'a, E: FromNumpy>(a: &'a mut PyReadwriteArray1<'_, E::Raw>, what: &str) -> PyResult<&'a mut [E]> {
        let s = slice_mut(a, what)?;
        // SAFETY: as in `elems`; the borrow is unique.
        Ok(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut E, s.len()) })
    }

    /// `$go::<E>(args)` for the element type E that the dtype name gives.
    macro_rules! by_dtype {
        ($dtype:expr, $go:ident($($arg:expr),*)) => {
            match $dtype {
                "float32" => $go::<f32>($($arg),*),
                "bfloat16" => $go::<Bf16>($($arg),*),
                "float16" => $go::<F16>($($arg),*),
                other => Err(PyTypeError::new_err(format!(
                    "dtype must be float32, float16 or bfloat16, got {other}"
                ))),
            }
        };
    }

    #[pyfunction]
    #[pyo3(signature = (gate, up, out, dtype, threads, isa=None))]
    fn swiglu_forward(
        py: Python<'_>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        type A<'a, 'py> = &'a Bound<'py, PyAny>;
        fn go<E: FromNumpy>(py: Python<'_>, isa: Isa, gate: A, up: A, out: A, threads: usize) -> PyResult<()> {
            let (g, u, mut o) = (read::<E>(gate)?, read::<E>(up)?, write::<E>(out)?);
            let (g, u, o) = (elems::<E>(&g, "gate")?, elems::<E>(&u, "up")?, elems_mut::<E>(&mut o, "out")?);
            run(py, || crate::swiglu::swiglu_forward(isa, g, u, o, threads))
        }
        let isa = parse_isa(isa)?;
        by_dtype!(dtype, go(py, isa, gate, up, out, threads))
    }

    #[pyfunction]
    #[pyo3(signature = (gate, up, grad, d_gate, d_up, dtype, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward(
        py: Python<'_>,
        gate: &Bound<'_, PyAny>,
        up: &Bound<'_, PyAny>,
        grad: &Bound<'_, PyAny>,
        d_gate: &Bound<'_, PyAny>,
        d_up: &Bound<'_, PyAny>,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        type A<'a, 'py> = &'a Bound<'py, PyAny>;
        #[allow(clippy::too_many_arguments)]
        fn go<E: FromNumpy>(py: Python<'_>, isa: Isa, gate: A, up: A, grad: A, d_gate: A, d_up: A, threads: usize) -> PyResult<()> {
            let (g, u, dh) = (read::<E>(gate)?, read::<E>(up)?, read::<E>(grad)?);
            let (mut dg, mut du) = (write::<E>(d_gate)?, write::<E>(d_up)?);
            let (g, u, dh) = (elems::<E>(&g, "gate")?, elems::<E>(&u, "up")?, elems::<E>(&dh, "grad")?);
            let (dg, du) = (elems_mut::<E>(&mut dg, "d_gate")?, elems_mut::<E>(&mut du, "d_up")?);
            run(py, || crate::swiglu::swiglu_backward(isa, g, u, dh, dg, du, threads))
        }
        let isa = parse_isa(isa)?;
        by_dtype!(dtype, go(py, isa, gate, up, grad, d_gate, d_up, threads))
    }

    #[pyfunction]
    #[pyo3(signature = (y, h, bt, rank, scale, dtype, threads, isa=None, b_rows=false))]
    #[allow(clippy::too_many_arguments)]
    fn lora_up_add(
        py: Python<'_>,
        y: &Bound<'_, PyAny>,
        h: PyReadonlyArray1<'_, f32>,
        bt: PyReadonlyArray1<'_, f32>,
        rank: usize,
        scale: f32,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
        b_rows: bool,
    ) -> PyResult<()> {
        #[allow(clippy::too_many_arguments)]
        fn go<E: FromNumpy>(
            py: Python<'_>, isa: Isa, y: &Bound<'_, PyAny>, h: &[f32], bt: &[f32], rank: usize, scale: f32,
            threads: usize, b_rows: bool,
        ) -> PyResult<()> {
            let mut y = write::<E>(y)?;
            let y = elems_mut::<E>(&mut y, "y")?;
            run(py, || crate::lora_up::lora_up_add(isa, y, h, bt, rank, scale, threads, b_rows))
        }
        let isa = parse_isa(isa)?;
        let (h, bt) = (slice(&h, "h")?, slice(&bt, "bt")?);
        by_dtype!(dtype, go(py, isa, y, h, bt, rank, scale, threads, b_rows))
    }

    #[pyfunction]
    #[pyo3(signature = (x, scale, weight, grad, out, dtype, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        scale: PyReadonlyArray1<'_, f32>,
        weight: PyReadonlyArray1<'_, f32>,
        grad: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        type A<'a, 'py> = &'a Bound<'py, PyAny>;
        #[allow(clippy::too_many_arguments)]
        fn go<E: FromNumpy>(py: Python<'_>, isa: Isa, x: A, s: &[f32], w: &[f32], grad: A, out: A, threads: usize) -> PyResult<()> {
            let (xa, dya, mut oa) = (read::<E>(x)?, read::<E>(grad)?, write::<E>(out)?);
            let (x, dy, o) = (elems::<E>(&xa, "x")?, elems::<E>(&dya, "grad")?, elems_mut::<E>(&mut oa, "out")?);
            run(py, || crate::rmsnorm::rmsnorm_backward(isa, x, s, w, dy, o, threads))
        }
        let isa = parse_isa(isa)?;
        let (s, w) = (slice(&scale, "scale")?, slice(&weight, "weight")?);
        by_dtype!(dtype, go(py, isa, x, s, w, grad, out, threads))
    }

    #[pyfunction]
    #[pyo3(signature = (logits, vocab, targets, ignore_index, grad, lse, loss, dtype, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_grad(
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
        vocab: usize,
        targets: PyReadonlyArray1<'_, i64>,
        ignore_index: i64,
        grad: &Bound<'_, PyAny>,
        mut lse: PyReadwriteArray1<'_, f32>,
        mut loss: PyReadwriteArray1<'_, f32>,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        type A<'a, 'py> = &'a Bound<'py, PyAny>;
        #[allow(clippy::too_many_arguments)]
        fn go<E: FromNumpy>(
            py: Python<'_>, isa: Isa, logits: A, vocab: usize, t: &[i64], ignore: i64, grad: A,
            lse: &mut [f32], loss: &mut [f32], threads: usize,
        ) -> PyResult<()> {
            let (xa, mut ga) = (read::<E>(logits)?, write::<E>(grad)?);
            let (x, g) = (elems::<E>(&xa, "logits")?, elems_mut::<E>(&mut ga, "grad")?);
            run(py, || crate::xent::cross_entropy_grad(isa, x, vocab, t, ignore, g, lse, loss, threads))
        }
        let isa = parse_isa(isa)?;
        let t = slice(&targets, "targets")?;
        let (lse, loss) = (slice_mut(&mut lse, "lse")?, slice_mut(&mut loss, "loss")?);
        by_dtype!(dtype, go(py, isa, logits, vocab, t, ignore_index, grad, lse, loss, threads))
    }

    #[pyfunction]
    #[pyo3(signature = (scores, dp, lse, out, d_out, keys, head_dim, scale, dtype, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn causal_softmax_grad(
        py: Python<'_>,
        scores: &Bound<'_, PyAny>,
        dp: &Bound<'_, PyAny>,
        lse: PyReadonlyArray1<'_, f32>,
        out: &Bound<'_, PyAny>,
        d_out: &Bound<'_, PyAny>,
        keys: usize,
        head_dim: usize,
        scale: f32,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        type A<'a, 'py> = &'a Bound<'py, PyAny>;
        #[allow(clippy::too_many_arguments)]
        fn go<E: FromNumpy>(
            py: Python<'_>, isa: Isa, scores: A, dp: A, lse: &[f32], out: A, d_out: A, keys: usize,
            head_dim: usize, scale: f32, threads: usize,
        ) -> PyResult<()> {
            let (mut sa, mut da) = (write::<E>(scores)?, write::<E>(dp)?);
            let (oa, ga) = (read::<E>(out)?, read::<E>(d_out)?);
            let (s, d) = (elems_mut::<E>(&mut sa, "scores")?, elems_mut::<E>(&mut da, "dp")?);
            let (o, g) = (elems::<E>(&oa, "out")?, elems::<E>(&ga, "d_out")?);
            run(py, || crate::attn_grad::causal_softmax_grad(isa, s, d, lse, o, g, keys, head_dim, scale, threads))
        }
        let isa = parse_isa(isa)?;
        let lse = slice(&lse, "lse")?;
        by_dtype!(dtype, go(py, isa, scores, dp, lse, out, d_out, keys, head_dim, scale, threads))
    }

    #[pyfunction]
    #[pyo3(signature = (scores, lse, keys, scale, dtype, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn causal_softmax(
        py: Python<'_>,
        scores: &Bound<'_, PyAny>,
        mut lse: PyReadwriteArray1<'_, f32>,
        keys: usize,
        scale: f32,
        dtype: &str,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        fn go<E: FromNumpy>(
            py: Python<'_>, isa: Isa, scores: &Bound<'_, PyAny>, lse: &mut [f32], keys: usize, scale: f32, threads: usize,
        ) -> PyResult<()> {
            let mut sa = write::<E>(scores)?;
            let s = elems_mut::<E>(&mut sa, "scores")?;
            run(py, || crate::attn_softmax::causal_softmax(isa, s, lse, keys, scale, threads))
        }
        let isa = parse_isa(isa)?;
        let lse = slice_mut(&mut lse, "lse")?;
        by_dtype!(dtype, go(py, isa, scores, lse, keys, scale, threads))
    }

    /// p and g of an optimizer step: float32, or bfloat16 as int16 bits.
    enum Param<'py> {
        F32(PyReadwriteArray1<'py, f32>, PyReadonlyArray1<'py, f32>),
        Bf16(PyReadwriteArray1<'py, i16>, PyReadonlyArray1<'py, i16>),
    }

    fn param<'py>(p: &Bound<'py, PyAny>, g: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Param<'py>> {
        match dtype {
            "float32" => Ok(Param::F32(p.extract()?, g.extract()?)),
            "bfloat16" => Ok(Param::Bf16(p.extract()?, g.extract()?)),
            other => Err(PyTypeError::new_err(format!(
                "optimizer parameters must be float32 or bfloat16, got {other}"
            ))),
        }
    }

    /// Calls `$body` with `$p`, `$g` bound to the parameter and gradient slices.
    macro_rules! with_param {
        ($prm:expr, $p:ident, $g:ident => $body:expr) => {
            match &mut $prm {
                Param::F32(a, b) => {
                    let $p: &mut [f32] = slice_mut(a, "parameter")?;
                    let $g: &[f32] = slice(b, "gradient")?;
                    $body
                }
                Param::Bf16(a, b) => {
                    let $p: &mut [Bf16] = as_elems_mut(slice_mut(a, "parameter")?);
                    let $g: &[Bf16] = as_elems(slice(b, "gradient")?);
                    $body
                }
            }
        };
    }

    /// One fused AdamW step with float32 state (rust/src/adamw.rs); the
    /// scalars are torch's, computed in Python.
    #[pyfunction]
    #[pyo3(signature = (p, g, m, v, dtype, decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps,
                        step_size, maximize, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        py: Python<'_>,
        p: &Bound<'_, PyAny>,
        g: &Bound<'_, PyAny>,
        mut m: PyReadwriteArray1<'_, f32>,
        mut v: PyReadwriteArray1<'_, f32>,
        dtype: &str,
        decay: f32,
        lerp_weight: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bc2_sqrt: f32,
        eps: f32,
        step_size: f32,
        maximize: bool,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        use crate::adamw::{self, AdamW32};
        let isa = parse_isa(isa)?;
        let h = AdamW32 { decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, maximize };
        let m = slice_mut(&mut m, "exp_avg")?;
        let v = slice_mut(&mut v, "exp_avg_sq")?;
        let mut prm = param(p, g, dtype)?;
        with_param!(prm, ps, gs => run(py, || adamw::adamw_step_isa(isa, ps, gs, m, v, &h, threads)))
    }

    /// One fused AdamW step with blockwise 8-bit state (rust/src/adamw8.rs).
    #[pyfunction]
    #[pyo3(signature = (p, g, qm, qv, absmax_m, absmax_v, dtype, beta1, one_minus_beta1, beta2,
                        one_minus_beta2, bc2_sqrt, eps, decay, step_size, maximize, threads, isa=None))]
    #[allow(clippy::too_many_arguments)]
    fn adamw8_step(
        py: Python<'_>,
        p: &Bound<'_, PyAny>,
        g: &Bound<'_, PyAny>,
        mut qm: PyReadwriteArray1<'_, u8>,
        mut qv: PyReadwriteArray1<'_, u8>,
        mut absmax_m: PyReadwriteArray1<'_, f32>,
        mut absmax_v: PyReadwriteArray1<'_, f32>,
        dtype: &str,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        one_minus_beta2: f32,
        bc2_sqrt: f32,
        eps: f32,
        decay: f32,
        step_size: f32,
        maximize: bool,
        threads: usize,
        isa: Option<&str>,
    ) -> PyResult<()> {
        use crate::adamw8::{self, AdamW8};
        let isa = parse_isa(isa)?;
        let h = AdamW8 { beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, decay, step_size, maximize };
        let qm = slice_mut(&mut qm, "state1")?;
        let qv = slice_mut(&mut qv, "state2")?;
        let am = slice_mut(&mut absmax_m, "absmax1")?;
        let av = slice_mut(&mut absmax_v, "absmax2")?;
        let mut prm = param(p, g, dtype)?;
        with_param!(prm, ps, gs => run(py, || adamw8::adamw8_step_isa(isa, ps, gs, qm, qv, am, av, &h, threads)))
    }

    /// Paged AdamW / AdamW8bit state (rust/src/paged_adamw.rs over the page
    /// store of rust/src/pages.rs); `inner` is None once closed.
    #[pyclass(module = "qpeft._native")]
    struct PagedState {
        inner: Option<crate::paged_adamw::PagedAdamW>,
    }

    /// A step item from Python: (param id, p, g, dtype, "adamw" | "adamw8", scalars, maximize).
    type StepItem<'py> = (usize, Bound<'py, PyAny>, Bound<'py, PyAny>, String, String, Vec<f32>, bool);

    fn paged_hyper(kind: &str, s: &[f32], maximize: bool) -> PyResult<crate::paged_adamw::Hyper> {
        use crate::adamw::AdamW32;
        use crate::adamw8::AdamW8;
        use crate::paged_adamw::Hyper;
        match (kind, s) {
            ("adamw", &[decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, step_size]) => Ok(Hyper::F32(AdamW32 {
                decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, maximize,
            })),
            ("adamw8", &[beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, decay, step_size]) => Ok(Hyper::Q8(AdamW8 {
                beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, decay, step_size, maximize,
            })),
            _ => Err(PyValueError::new_err(format!(
                "step scalars must be 'adamw' with 7 values or 'adamw8' with 8, got {kind:?} with {}",
                s.len()
            ))),
        }
    }

    impl PagedState {
        fn get(&mut self) -> PyResult<&mut crate::paged_adamw::PagedAdamW> {
            self.inner
                .as_mut()
                .ok_or_else(|| PyValueError::new_err("this paged optimizer state was closed; create a new optimizer"))
        }
    }

    #[pymethods]
    impl PagedState {
        #[new]
        #[pyo3(signature = (page_bytes, max_resident_bytes, state_dir=None))]
        fn new(page_bytes: usize, max_resident_bytes: usize, state_dir: Option<std::path::PathBuf>) -> PyResult<Self> {
            use crate::pages::PageStore;
            let store = match state_dir {
                None => PageStore::in_host_memory(page_bytes, max_resident_bytes),
                Some(dir) => PageStore::in_file(&dir, page_bytes, max_resident_bytes),
            }
            .map_err(to_py)?;
            Ok(PagedState { inner: Some(crate::paged_adamw::PagedAdamW::new(store)) })
        }

        /// Add a parameter with zero state ("f32" or "q8"); returns its id.
        fn add_param(&mut self, py: Python<'_>, numel: usize, kind: &str) -> PyResult<usize> {
            use crate::paged_adamw::Kind;
            let kind = match kind {
                "f32" => Kind::F32,
                "q8" => Kind::Q8,
                other => return Err(PyValueError::new_err(format!("kind must be 'f32' or 'q8', got {other:?}"))),
            };
            let inner = self.get()?;
            run(py, || inner.add_param(numel, kind))
        }

        #[pyo3(signature = (items, threads, isa=None))]
        fn step(&mut self, py: Python<'_>, items: Vec<StepItem<'_>>, threads: usize, isa: Option<&str>) -> PyResult<()> {
            use crate::paged_adamw::{Item, ParamData};
            let isa = parse_isa(isa)?;
            let mut prms = Vec::with_capacity(items.len());
            let mut heads = Vec::with_capacity(items.len());
            for (id, p, g, dtype, kind, scalars, maximize) in &items {
                prms.push(param(p, g, dtype)?);
                heads.push((*id, paged_hyper(kind, scalars, *maximize)?));
            }
            let mut work = Vec::with_capacity(items.len());
            for (prm, (id, hyper)) in prms.iter_mut().zip(heads) {
                let data = match prm {
                    Param::F32(a, b) => ParamData::F32 { p: slice_mut(a, "parameter")?, g: slice(b, "gradient")? },
                    Param::Bf16(a, b) => ParamData::Bf16 {
                        p: as_elems_mut(slice_mut(a, "parameter")?),
                        g: as_elems(slice(b, "gradient")?),
                    },
                };
                work.push(Item { param: id, data, hyper });
            }
            let inner = self.get()?;
            run(py, || inner.step(&mut work, isa, threads))
        }

        /// Copy a float32-state parameter's m and v out (`write` false) or in.
        fn transfer_f32(
            &mut self,
            py: Python<'_>,
            param: usize,
            mut m: PyReadwriteArray1<'_, f32>,
            mut v: PyReadwriteArray1<'_, f32>,
            write: bool,
        ) -> PyResult<()> {
            use crate::paged_adamw::StateMut;
            let state = StateMut::F32 { m: slice_mut(&mut m, "exp_avg")?, v: slice_mut(&mut v, "exp_avg_sq")? };
            let inner = self.get()?;
            run(py, || if write { inner.write_state(param, state) } else { inner.read_state(param, state) })
        }

        /// Copy an 8-bit-state parameter's codes and scales out (`write` false) or in.
        #[allow(clippy::too_many_arguments)]
        fn transfer_q8(
            &mut self,
            py: Python<'_>,
            param: usize,
            mut qm: PyReadwriteArray1<'_, u8>,
            mut qv: PyReadwriteArray1<'_, u8>,
            mut am: PyReadwriteArray1<'_, f32>,
            mut av: PyReadwriteArray1<'_, f32>,
            write: bool,
        ) -> PyResult<()> {
            use crate::paged_adamw::StateMut;
            let state = StateMut::Q8 {
                qm: slice_mut(&mut qm, "state1")?,
                qv: slice_mut(&mut qv, "state2")?,
                am: slice_mut(&mut am, "absmax1")?,
                av: slice_mut(&mut av, "absmax2")?,
            };
            let inner = self.get()?;
            run(py, || if write { inner.write_state(param, state) } else { inner.read_state(param, state) })
        }

        /// Counters of the page store (bytes and page counts).
        fn stats(&mut self) -> PyResult<std::collections::HashMap<&'static str, u64>> {
            let s = self.get()?.stats();
            Ok([
                ("page_bytes", s.page_bytes as u64),
                ("pages", s.pages as u64),
                ("total_bytes", (s.pages * s.page_bytes) as u64),
                ("max_resident_bytes", s.max_resident_bytes as u64),
                ("resident_bytes", s.resident_bytes as u64),
                ("peak_resident", s.peak_resident_bytes as u64),
                ("page_ins", s.page_ins),
                ("page_outs", s.page_outs),
            ]
            .into_iter()
            .collect())
        }

        /// The backing file, or None for host memory (or once closed).
        fn path(&self) -> Option<std::path::PathBuf> {
            self.inner.as_ref().and_then(|p| p.store().backing_path().map(|p| p.to_path_buf()))
        }

        /// Free the resident pages and remove the backing file.
        fn close(&mut self) {
            self.inner = None;
        }

        #[getter]
        fn closed(&self) -> bool {
            self.inner.is_none()
        }
    }

    /// Panics inside a kernel call on purpose, so tests can check that a panic
    /// reaches Python as RuntimeError instead of aborting the interpreter. The
    /// panic happens on a worker thread of the pool (`threads` > 1) or on the
    /// calling thread, the two ways a kernel can fail. Not for other use.
    #[pyfunction]
    #[pyo3(signature = (message, threads=1))]
    fn _panic_for_test(py: Python<'_>, message: &str, threads: usize) -> PyResult<()> {
        let message = message.to_owned();
        run(py, move || -> Result<(), Error> {
            if threads > 1 {
                // rayon carries a worker's panic back to the caller of install().
                crate::parallel::pool(threads).install(|| panic!("{message}"))
            }
            panic!("{message}")
        })
    }

    #[pymodule]
    #[pyo3(name = "_native")]
    fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
        m.add_function(wrap_pyfunction!(cpu_has_bf16_dot, m)?)?;
        m.add_function(wrap_pyfunction!(code_4bit, m)?)?;
        m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
        m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
        m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
        m.add_function(wrap_pyfunction!(quantize_blockwise, m)?)?;
        m.add_function(wrap_pyfunction!(dequantize_blockwise, m)?)?;
        m.add_function(wrap_pyfunction!(lora_up_add, m)?)?;
        m.add_function(wrap_pyfunction!(swiglu_forward, m)?)?;
        m.add_function(wrap_pyfunction!(swiglu_backward, m)?)?;
        m.add_function(wrap_pyfunction!(rmsnorm_backward, m)?)?;
        m.add_function(wrap_pyfunction!(cross_entropy_grad, m)?)?;
        m.add_function(wrap_pyfunction!(causal_softmax_grad, m)?)?;
        m.add_function(wrap_pyfunction!(causal_softmax, m)?)?;
        m.add_function(wrap_pyfunction!(adamw_step, m)?)?;
        m.add_function(wrap_pyfunction!(adamw8_step, m)?)?;
        m.add_class::<PagedState>()?;
        m.add_class::<Gemv4Weight>()?;
        m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
