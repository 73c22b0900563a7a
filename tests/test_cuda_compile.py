"""Every CUDA kernel compiles for sm_80 and sm_90, without a GPU.

NVRTC (``libnvrtc.so`` from PyPI's ``nvidia-cuda-nvrtc`` wheel, a dependency
of torch's CUDA builds and listed in qpeft's ``dev`` extra) is called through
ctypes with exactly the source text and options that :mod:`qpeft._cuda`
hands to CuPy at run time; a failure shows the compiler's log.
"""

import ctypes
import glob
import os
import re
import site
import sys

import pytest

from qpeft import _cuda

ARCHS = ("sm_80", "sm_90")


def _find_nvrtc() -> str | None:
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in roots:
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            hits = sorted(p for p in glob.glob(os.path.join(root, pattern)) if "builtins" not in p and "alt" not in p)
            if hits:
                return hits[0]
    for name in ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            pass
    return None


@pytest.fixture(scope="module")
def nvrtc():
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc.so not found: pip install nvidia-cuda-nvrtc (part of qpeft's dev extra)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def _compile(lib, source: str, name: str, options: tuple[str, ...]) -> tuple[bool, str, bytes]:
    """(success, log, cubin) of one NVRTC compilation."""
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        log = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetProgramLog(prog, log), "log")
        cubin = b""
        if status == 0:
            _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
            buf = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetCUBIN(prog, buf), "cubin")
            cubin = buf.raw
        return status == 0, log.value.decode(errors="replace"), cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_compiled: dict[tuple[str, str], tuple[bool, str, bytes]] = {}


def _compile_file(lib, file: str, arch: str) -> tuple[bool, str, bytes]:
    key = (file, arch)
    if key not in _compiled:
        _compiled[key] = _compile(lib, _cuda.kernel_source(file), file, _cuda.nvrtc_options(arch))
    return _compiled[key]


# gemv4.cu stamps out 18 kernels and takes about 15 s per architecture on 2 cores.
_FILES = [pytest.param(f, marks=pytest.mark.slow) if f == "gemv4.cu" else f for f in _cuda.KERNEL_FILES]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", _FILES)
def test_kernel_compiles(nvrtc, file, arch):
    ok, log, cubin = _compile_file(nvrtc, file, arch)
    assert ok, f"{file} does not compile for {arch}:\n{log}"
    # Warnings are errors in waiting (an unused variable, a narrowing conversion).
    assert "warning" not in log.lower(), f"{file} compiles for {arch} with warnings:\n{log}"
    assert cubin[:4] == b"\x7fELF", "NVRTC returned no cubin"


@pytest.mark.slow
def test_every_launched_kernel_exists_in_the_binary(nvrtc):
    """The names _cuda.py launches are the extern "C" symbols of the compiled modules."""
    src = open(_cuda.__file__).read()
    wanted = {
        "nf4.cu": [f"{op}_4bit_{s}" for op in ("quantize", "dequantize") for s in ("f32", "bf16", "f16")],
        "blockwise8.cu": [f"{op}_blockwise_{s}" for op in ("quantize", "dequantize") for s in ("f32", "bf16", "f16")],
        "gemv4.cu": [f"gemv4_tiled_{s}_t{t}" for s in ("f32", "bf16", "f16") for t in (1, 2, 4, 8, 16)]
        + [f"gemv4_generic_{s}" for s in ("f32", "bf16", "f16")],
        "adamw.cu": [f"adamw{b}_{s}" for b in ("32", "8") for s in ("f32", "bf16")],
        "pages.cu": ["copy_pages"],
    }
    assert set(wanted) == set(_cuda.KERNEL_FILES)
    for file, names in wanted.items():
        ok, log, cubin = _compile_file(nvrtc, file, "sm_90")
        assert ok, log
        for name in names:
            assert name.encode() + b"\x00" in cubin, f"{file} has no kernel {name}"
    # and _cuda.py names them the way the files define them
    for stem in ("quantize_4bit_", "dequantize_4bit_", "quantize_blockwise_", "dequantize_blockwise_",
                 "gemv4_tiled_", "gemv4_generic_", "adamw32_", "adamw8_", "copy_pages"):
        assert stem in src, stem


def test_code_book_constants_match_the_cpu_kernels():
    """The hexadecimal NF4/FP4 tables in codebook.cuh are qpeft's CPU code books, bit for bit."""
    import numpy as np

    import qpeft

    text = _cuda.kernel_source("nf4.cu")

    def table(macro: str) -> np.ndarray:
        body = re.search(rf"#define {macro}((?:.*\\\n)+.*)", text).group(1)
        vals = [float.fromhex(v.strip().rstrip("f")) for v in body.replace("\\\n", " ").split(",")]
        return np.array(vals, dtype=np.float32)

    for qt, macro in (("nf4", "NF4_VALUES"), ("fp4", "FP4_VALUES")):
        expect = qpeft.get_4bit_type(qt).numpy()
        assert table(macro).view(np.uint32).tolist() == expect.view(np.uint32).tolist(), qt
    nf4 = qpeft.get_4bit_type("nf4").numpy()
    mid = ((nf4[:-1] + nf4[1:]) * np.float32(0.5)).astype(np.float32)
    assert table("NF4_MIDPOINTS").view(np.uint32).tolist() == mid.view(np.uint32).tolist()
    # The FP4 thresholds are codebook.rs's float literals, rounded to float32.
    rust = open(os.path.join(os.path.dirname(__file__), "..", "rust", "src", "codebook.rs")).read()
    lits = re.search(r"FP4_THRESHOLDS: \[f32; 7\] = \[(.*?)\];", rust, re.S).group(1)
    expect = np.array([x.strip().replace("_", "") for x in lits.split(",") if x.strip()], dtype=np.float32)
    assert table("FP4_THRESHOLDS").view(np.uint32).tolist() == expect.view(np.uint32).tolist()
