"""Parameter-efficient fine-tuning methods, in Hugging Face PEFT's file format.

LoRA (with rsLoRA and DoRA) on dense and 4-bit (QLoRA) linear layers:

>>> from qpeft.tuners import LoraConfig, get_peft_model  # doctest: +SKIP
>>> model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
>>> model.save_pretrained("adapter")  # loads with peft.PeftModel.from_pretrained  # doctest: +SKIP
"""

from .config import LoraConfig, PeftConfig, load_config
from .lora import LoraLinear
from .lora_autograd import lora_linear_4bit
from .model import PeftModel, get_peft_model

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "PeftConfig",
    "PeftModel",
    "get_peft_model",
    "load_config",
    "lora_linear_4bit",
]
