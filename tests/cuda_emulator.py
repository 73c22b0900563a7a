"""Runs qpeft's CUDA kernels on the CPU, for machines without a GPU.

Each kernel file (the exact text qpeft._cuda compiles, ``kernel_source``)
is compiled by the host C++ compiler with tests/cuda_host_emulation.h
(threads, barriers, shuffles, IEEE float intrinsics) into a shared library;
:meth:`Emulator.launch` has the signature of ``qpeft._cuda._launch`` and runs
a grid as one OS thread per CUDA thread, block after block. Tests patch it
in for ``_launch`` so that ``qpeft._cuda``'s own argument handling (grids,
pointers, scalars) runs too, on CPU tensors.

This checks the kernels' logic (indexing, rounding, reductions, tails); it
says nothing about speed or about the GPU's compiler and hardware.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from qpeft import _cuda

HEADER = Path(__file__).with_name("cuda_host_emulation.h")

_CTYPES = {np.uint64: ctypes.c_void_p, np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


class Emulator:
    def __init__(self, build_dir: Path) -> None:
        self.build_dir = Path(build_dir)
        self.libs: dict[str, ctypes.CDLL] = {}
        self.launches: list[tuple[str, int, int]] = []

    def lib(self, file: str) -> ctypes.CDLL:
        if file not in self.libs:
            src = self.build_dir / (file + ".cc")
            src.write_text(_cuda.kernel_source(file))
            out = self.build_dir / (file + ".so")
            cmd = [compiler(), "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                   "-w", "-include", str(HEADER), str(src), "-o", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"host compile of {file} failed:\n{r.stderr[-4000:]}")
            lib = ctypes.CDLL(str(out))
            for f in ("qe_begin_block", "qe_set_thread"):
                getattr(lib, f).argtypes = [ctypes.c_uint] * (3 if f == "qe_begin_block" else 2)
            self.libs[file] = lib
        return self.libs[file]

    def launch(self, device, file: str, name: str, grid: int, block: int, args: tuple) -> None:
        lib = self.lib(file)
        fn = getattr(lib, name)
        cargs = []
        for a in args:
            kind = _CTYPES.get(type(a))
            if kind is None:
                raise TypeError(f"{name}: argument {a!r} of type {type(a).__name__} is not a numpy scalar")
            cargs.append(kind(int(a)) if kind is ctypes.c_void_p else kind(a.item()))
        fn.restype = None
        self.launches.append((name, grid, block))

        def run(t: int, b: int) -> None:
            lib.qe_set_thread(t, b)
            fn(*cargs)
            lib.qe_exit_thread()

        for b in range(grid):
            lib.qe_begin_block(b, block, grid)
            threads = [threading.Thread(target=run, args=(t, b)) for t in range(block)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
