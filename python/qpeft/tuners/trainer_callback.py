"""A transformers ``TrainerCallback`` that puts a PEFT adapter into every checkpoint.

transformers' ``Trainer`` saves a model that is neither a transformers nor a
PEFT class as its whole state dict (``model.safetensors``, which is what
``resume_from_checkpoint`` reads back). With this callback each
``checkpoint-N`` folder also holds ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's format, so ``peft.PeftModel.from_pretrained``
or :meth:`qpeft.tuners.PeftModel.from_pretrained` load a checkpoint directly:

>>> from qpeft.tuners.trainer_callback import SaveAdapterCallback  # doctest: +SKIP
>>> trainer = Trainer(model=peft_model, args=args, callbacks=[SaveAdapterCallback(peft_model)])  # doctest: +SKIP

This module needs transformers; ``qpeft.tuners`` itself does not import it.
"""

from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - transformers is optional
    raise ImportError(
        "qpeft.tuners.trainer_callback needs transformers (pip install transformers); "
        "without it, save adapters with PeftModel.save_pretrained"
    ) from e

from .model import PeftModel

__all__ = ["SaveAdapterCallback"]


class SaveAdapterCallback(TrainerCallback):
    """After each checkpoint the Trainer writes, save ``peft_model``'s adapters into it in PEFT's format.

    Args:
        peft_model: the qpeft model being trained. Pass it even when the
            trainer got ``peft_model.get_base_model()`` (TRL's ``SFTTrainer``):
            the adapters live in that model, the adapter names and configs here.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        if not isinstance(peft_model, PeftModel):
            raise TypeError(
                f"SaveAdapterCallback needs the qpeft PeftModel (from get_peft_model), got {type(peft_model).__name__}"
            )
        self.peft_model = peft_model

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            # Hyperparameter search puts checkpoints under per-trial folders this callback cannot see.
            raise FileNotFoundError(
                f"SaveAdapterCallback: the Trainer's checkpoint folder {folder} does not exist; "
                "save the adapter with peft_model.save_pretrained(folder) instead"
            )
        self.peft_model.save_pretrained(folder)
