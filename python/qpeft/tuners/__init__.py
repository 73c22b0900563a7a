"""Parameter-efficient fine-tuning methods, in Hugging Face PEFT's file format.

LoRA (with rsLoRA and DoRA) on dense and 4-bit (QLoRA) linear layers:

>>> from qpeft.tuners import LoraConfig, get_peft_model  # doctest: +SKIP
>>> model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
>>> model.save_pretrained("adapter")  # loads with peft.PeftModel.from_pretrained  # doctest: +SKIP

Prompt tuning, P-tuning and prefix tuning (deep prompt tuning in the P-tuning
v2 style is prefix tuning without projection) on Llama/SmolLM2, Qwen2 and GPT-2:

>>> from qpeft.tuners import PrefixTuningConfig, PromptTuningConfig  # doctest: +SKIP
>>> model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=20))  # doctest: +SKIP

Bottleneck adapters (Houlsby et al. 2019, or He et al. 2022's parallel form),
saved in PEFT's layout under qpeft's own ``peft_type`` ``"QPEFT_BOTTLENECK"``:

>>> from qpeft.tuners import BottleneckConfig  # doctest: +SKIP
>>> model = get_peft_model(model, BottleneckConfig(bottleneck_size=64, mode="parallel", scaling=4.0))  # doctest: +SKIP
"""

from .bottleneck_config import BOTTLENECK, BottleneckConfig
from .bottleneck_model import BottleneckModel
from .config import LoraConfig, PeftConfig, load_config
from .lora import LoraLinear
from .lora_autograd import lora_linear_4bit
from .model import PeftModel, get_peft_model
from .prompt_config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    deep_prompt_tuning_config,
)
from .prompt_model import PromptLearningModel

__all__ = [
    "BOTTLENECK",
    "BottleneckConfig",
    "BottleneckModel",
    "LoraConfig",
    "LoraLinear",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "deep_prompt_tuning_config",
    "get_peft_model",
    "load_config",
    "lora_linear_4bit",
]
