"""qpeft: fine-tune language models on hardware that is too small for them.

NF4/FP4 4-bit base weights with double-quantized scales, byte-compatible with
bitsandbytes, computed by Rust kernels on CPU and CUDA kernels (compiled at
run time, ``pip install "qpeft[cuda]"``) on a GPU.

>>> import torch, qpeft
>>> w = torch.randn(64, 64)
>>> packed, state = qpeft.quantize_4bit(w, compress_statistics=True)
>>> qpeft.dequantize_4bit(packed, state).shape
torch.Size([64, 64])
"""

from .functional import (
    BLOCK_SIZES,
    QUANT_TYPES,
    QuantState,
    cpu_isa,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_blockwise,
    gemv_4bit,
    get_4bit_type,
    quantize_4bit,
    quantize_blockwise,
)

from .autograd import matmul_4bit
from .nn import Linear4bit, dequantize_model, quantize_model
from .checkpoint import load_quantized, save_quantized
from . import optim, tuners
from .tuners import LoraConfig, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "BLOCK_SIZES",
    "Linear4bit",
    "LoraConfig",
    "PeftModel",
    "QUANT_TYPES",
    "QuantState",
    "__version__",
    "cpu_isa",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_model",
    "gemv_4bit",
    "get_4bit_type",
    "get_peft_model",
    "load_quantized",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_model",
    "save_quantized",
]
