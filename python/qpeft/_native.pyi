# Type stub for the Rust extension qpeft._native (rust/src/lib.rs).
# Arrays are zero-copy NumPy views of contiguous CPU torch tensors; float16 and
# bfloat16 travel as int16 bits with `dtype` naming the real type.
import pathlib
from typing import Literal, Optional

import numpy as np
import numpy.typing as npt

_Float = Literal["float32", "float16", "bfloat16"]

__version__: str

def cpu_isa() -> Literal["avx512", "avx2", "neon", "scalar"]: ...
def cpu_has_bf16_dot() -> bool: ...
def code_4bit(quant_type: Literal["nf4", "fp4"]) -> list[float]: ...
def dynamic_map(signed: bool) -> list[float]: ...
def quantize_4bit(
    x: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    quant_type: Literal["nf4", "fp4"],
    blocksize: int,
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    quant_type: Literal["nf4", "fp4"],
    blocksize: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    threads: int,
    absmax: Optional[npt.NDArray[np.float32]] = None,
    qabsmax: Optional[npt.NDArray[np.uint8]] = None,
    absmax2: Optional[npt.NDArray[np.float32]] = None,
    code2: Optional[npt.NDArray[np.float32]] = None,
    offset: float = 0.0,
    blocksize2: int = 256,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
    round_to: Optional[Literal["bfloat16", "float16"]] = None,
    cols: Optional[int] = None,
    stride: Optional[int] = None,
) -> None:
    """Blockwise 4-bit dequantization into ``out``; with ``cols`` and ``stride``
    each row of ``cols`` values goes to the first ``cols`` of a row of ``stride``."""
def quantize_blockwise(
    x: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    code: npt.NDArray[np.float32],
    blocksize: int,
    out: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    threads: int,
    offset: float = 0.0,
) -> None: ...
def dequantize_blockwise(
    q: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    code: npt.NDArray[np.float32],
    blocksize: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    threads: int,
    offset: float = 0.0,
) -> None: ...
def swiglu_forward(
    gate: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    up: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def swiglu_backward(
    gate: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    up: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    grad: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    d_gate: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    d_up: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def lora_up_add(
    y: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    h: npt.NDArray[np.float32],
    bt: npt.NDArray[np.float32],
    rank: int,
    scale: float,
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
    b_rows: bool = False,
) -> None: ...
def rmsnorm_backward(
    x: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    scale: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def causal_softmax(
    scores: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    lse: npt.NDArray[np.float32],
    keys: int,
    scale: float,
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def causal_softmax_grad(
    scores: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    dp: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    lse: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    d_out: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    keys: int,
    head_dim: int,
    scale: float,
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def cross_entropy_grad(
    logits: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    vocab: int,
    targets: npt.NDArray[np.int64],
    ignore_index: int,
    grad: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    lse: npt.NDArray[np.float32],
    loss: npt.NDArray[np.float32],
    dtype: _Float,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def adamw_step(
    p: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    g: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    m: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    dtype: Literal["float32", "bfloat16"],
    decay: float,
    lerp_weight: float,
    beta2: float,
    one_minus_beta2: float,
    bc2_sqrt: float,
    eps: float,
    step_size: float,
    maximize: bool,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...
def adamw8_step(
    p: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    g: npt.NDArray[np.float32] | npt.NDArray[np.int16],
    qm: npt.NDArray[np.uint8],
    qv: npt.NDArray[np.uint8],
    absmax_m: npt.NDArray[np.float32],
    absmax_v: npt.NDArray[np.float32],
    dtype: Literal["float32", "bfloat16"],
    beta1: float,
    one_minus_beta1: float,
    beta2: float,
    one_minus_beta2: float,
    bc2_sqrt: float,
    eps: float,
    decay: float,
    step_size: float,
    maximize: bool,
    threads: int,
    isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
) -> None: ...

class Gemv4Weight:
    """A 4-bit weight's buffers checked once for repeated ``run`` calls (rust/src/gemv.rs)."""

    def __init__(
        self,
        packed: npt.NDArray[np.uint8],
        quant_type: Literal["nf4", "fp4"],
        blocksize: int,
        n: int,
        k: int,
        absmax: Optional[npt.NDArray[np.float32]] = None,
        qabsmax: Optional[npt.NDArray[np.uint8]] = None,
        absmax2: Optional[npt.NDArray[np.float32]] = None,
        code2: Optional[npt.NDArray[np.float32]] = None,
        offset: float = 0.0,
        blocksize2: int = 256,
    ) -> None: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    def run(
        self,
        x: int,
        out: int,
        dtype: _Float,
        tokens: int,
        threads: int,
        isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
    ) -> None:
        """``out = x @ W.T``; ``x`` and ``out`` are ``data_ptr()`` addresses of contiguous CPU buffers (internal)."""

class PagedState:
    """Paged AdamW / AdamW8bit state (rust/src/paged_adamw.rs); ``state_dir`` None keeps pages in host memory."""

    def __init__(self, page_bytes: int, max_resident_bytes: int, state_dir: Optional[str] = None) -> None: ...
    def add_param(self, numel: int, kind: Literal["f32", "q8"]) -> int: ...
    def step(
        self,
        items: list[
            tuple[
                int,
                npt.NDArray[np.float32] | npt.NDArray[np.int16],
                npt.NDArray[np.float32] | npt.NDArray[np.int16],
                Literal["float32", "bfloat16"],
                Literal["adamw", "adamw8"],
                list[float],
                bool,
            ]
        ],
        threads: int,
        isa: Optional[Literal["scalar", "neon", "avx2", "avx512"]] = None,
    ) -> None: ...
    def transfer_f32(
        self, param: int, m: npt.NDArray[np.float32], v: npt.NDArray[np.float32], write: bool
    ) -> None: ...
    def transfer_q8(
        self,
        param: int,
        qm: npt.NDArray[np.uint8],
        qv: npt.NDArray[np.uint8],
        am: npt.NDArray[np.float32],
        av: npt.NDArray[np.float32],
        write: bool,
    ) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def path(self) -> Optional[pathlib.Path]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
def _panic_for_test(message: str, threads: int = 1) -> None:
    """Test hook: panics inside Rust on purpose (on a pool worker when threads > 1); always raises
    RuntimeError, showing that a panic never aborts the interpreter. Not for other use."""
    ...
