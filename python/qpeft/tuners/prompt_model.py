"""Prompt tuning, P-tuning and prefix tuning over a causal LM, with PEFT's semantics.

:class:`PromptLearningModel` is the tuner :class:`~qpeft.tuners.PeftModel`
builds for ``PROMPT_TUNING``, ``P_TUNING`` and ``PREFIX_TUNING`` configs. It
changes no layer of the model (so a 4-bit base works as is); it changes what
goes in:

* prompt tuning and P-tuning prepend ``num_virtual_tokens`` embeddings to the
  input embeddings, ones to the attention mask and ``-100`` to the labels;
  ``position_ids`` are dropped (with a warning), as in PEFT;
* prefix tuning hands the model a key/value cache that already holds
  ``num_virtual_tokens`` positions in every layer, prepends ones to the
  attention mask and shifts given ``position_ids`` by ``num_virtual_tokens``.

``generate`` puts the virtual tokens in once, at the first step: the prompt
embeddings before the input, or the prefix into the cache ``generate`` made;
attention masks and position ids are extended the same way at every step,
so greedy decoding gives what repeated full forward passes give.

The adapter file holds one tensor, ``prompt_embeddings`` (no
``base_model.model.`` prefix, as PEFT writes it): the virtual tokens as the
model sees them, i.e. the encoder's output for P-tuning and projected
prefixes. Those two therefore load for inference only.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .prompt_config import PREFIX_TUNING, PROMPT_TUNING, P_TUNING, PromptLearningConfig
from .prompt_encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, PromptModule, init_token_ids

__all__ = ["EMBEDDINGS_KEY", "SUPPORTED_MODEL_TYPES", "PromptLearningModel"]

#: The single key of a prompt adapter's ``adapter_model.safetensors``.
EMBEDDINGS_KEY = "prompt_embeddings"
#: ``config.model_type`` values the prompt methods are tested on (decoder-only causal LMs).
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _geometry(model: nn.Module, peft_type: str) -> _Geometry:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{peft_type} in qpeft supports decoder-only causal LMs of model types {list(SUPPORTED_MODEL_TYPES)} "
            f"(SmolLM2 is 'llama'); this model is {type(model).__name__} with model_type {model_type!r}"
        )
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise ValueError(
            f"{peft_type} needs the causal LM with its output head (e.g. LlamaForCausalLM), got {type(model).__name__}"
        )
    heads = config.num_attention_heads
    hidden = config.hidden_size
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    vocab = model.get_input_embeddings().num_embeddings
    return _Geometry(hidden, config.num_hidden_layers, heads, kv, head_dim, vocab)


def _complete(config: PromptLearningConfig, geo: _Geometry) -> PromptLearningConfig:
    """A copy of ``config`` with the model-determined fields filled in (and checked against the model)."""
    config = dataclasses.replace(config)
    config.num_transformer_submodules = 1
    if config.task_type is None:
        config.task_type = "CAUSAL_LM"
    if config.num_layers is None:
        config.num_layers = geo.layers
    if config.peft_type == PREFIX_TUNING:
        # Each layer's cache holds num_key_value_heads heads (grouped-query attention), which PEFT records
        # as token_dim = num_key_value_heads * head_dim and num_attention_heads = num_key_value_heads.
        need = {"token_dim": geo.kv_heads * geo.head_dim, "num_attention_heads": geo.kv_heads,
                "num_layers": geo.layers}
    else:
        need = {"token_dim": geo.hidden}
        if config.num_attention_heads is None:
            config.num_attention_heads = geo.heads
    for name, value in need.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise ValueError(
                f"{config.peft_type} on this model needs {name}={value} (the adapter would not fit its "
                f"{'key/value cache' if config.peft_type == PREFIX_TUNING else 'embeddings'}), the config says "
                f"{given}; leave {name} unset to take it from the model"
            )
        setattr(config, name, value)
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    return config


def _load_tokenizer(config) -> Any:
    tok = config.tokenizer_name_or_path
    if not isinstance(tok, (str, bytes)) and not hasattr(tok, "__fspath__"):
        return tok
    import transformers

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # an adapter config must not be able to run code
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tok), **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load the tokenizer {str(tok)!r} for prompt_tuning_init='TEXT' ({e}); pass the folder of the "
            "model's tokenizer or the tokenizer object itself as tokenizer_name_or_path"
        ) from None


class PromptLearningModel(nn.Module):
    """A causal LM with prompt-method adapters (one active at a time).

    Args:
        model: the transformers causal LM (dense or 4-bit); not modified.
        config: the first adapter's :class:`~qpeft.tuners.PromptTuningConfig`,
            :class:`~qpeft.tuners.PromptEncoderConfig` or
            :class:`~qpeft.tuners.PrefixTuningConfig`.
        adapter_name: its name.

    Raises:
        ValueError: the model is not a supported causal LM, or the config
            does not fit it.
    """

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed the forward's past_key_values to cache.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.inject_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -------------------------------------------------------------- adapters

    def inject_adapter(self, name: str, config: PromptLearningConfig) -> None:
        """Add adapter ``name`` (a new prompt encoder); the model itself is not touched."""
        if not isinstance(config, PromptLearningConfig):
            raise TypeError(f"prompt methods need a prompt config, got {type(config).__name__}")
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first")
        if not name or "." in name:
            raise ValueError(f"adapter names must be non-empty and contain no '.', got {name!r}")
        config = _complete(config, _geometry(self.model, config.peft_type))
        if config.peft_type == PREFIX_TUNING:
            self._refuse_checkpointing()
        trainable = not config.inference_mode
        embeddings = self.model.get_input_embeddings()
        if config.peft_type == PROMPT_TUNING:
            ids = None
            if trainable:
                tokenizer = _load_tokenizer(config) if config.prompt_tuning_init == "TEXT" else None
                ids = init_token_ids(config, embeddings.num_embeddings, tokenizer)
            encoder: PromptModule = PromptEmbedding(config, embeddings, ids)
        elif config.peft_type == P_TUNING:
            encoder = PromptEncoder(config, trainable)
        else:
            encoder = PrefixEncoder(config, trainable)
        # Adapter parameters are float32 whatever the model's dtype; only the device follows the model.
        self.prompt_encoder[name] = encoder.to(embeddings.weight.device)
        self.peft_config[name] = config

    def set_adapter(self, names) -> None:
        """Activate adapter ``names`` (one name: prompt methods do not combine adapters)."""
        names = [names] if isinstance(names, str) else list(names)
        if len(names) != 1:
            raise ValueError(f"prompt methods use one adapter at a time; pass a single name, got {names}")
        if names[0] not in self.peft_config:
            raise ValueError(f"no adapter named {names[0]!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        del self.prompt_encoder[name]
        del self.peft_config[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def mark_trainable(self, trainable: bool) -> None:
        """Only the active adapter's encoder requires gradients (nothing with ``trainable=False``)."""
        self.model.requires_grad_(False)
        self.prompt_encoder.requires_grad_(False)
        if trainable:
            for name in self.active_adapters:
                self.prompt_encoder[name].requires_grad_(True)

    # The rest of the tuner interface PeftModel uses: prompt methods replace no layers and merge nothing.

    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """No layer is replaced by a prompt method."""
        return iter(())

    def saved_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Prompt methods train no copies of base modules."""
        return iter(())

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def merge(self, names=None, keep_original: bool = False) -> dict[str, float]:
        raise ValueError(
            "prompt methods add virtual tokens, not weight updates, so there is nothing to merge into the weights; "
            "keep the PeftModel for inference, or unload() to get the base model back"
        )

    def merge_and_unload(self, names=None, dense=None, dtype=None):
        self.merge()

    # ---------------------------------------------------------- PEFT's keys

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name`` as PEFT saves it: ``{"prompt_embeddings": virtual tokens}``."""
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        return {EMBEDDINGS_KEY: self.prompt_encoder[name].to_save()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Load a saved ``prompt_embeddings`` into adapter ``name``; the shape must fit."""
        unexpected = sorted(k for k in tensors if k != EMBEDDINGS_KEY)
        if unexpected:
            raise ValueError(
                f"a {self.peft_config[name].peft_type} adapter file holds only {EMBEDDINGS_KEY!r}; this one also has "
                f"{unexpected[:5]}"
            )
        if EMBEDDINGS_KEY not in tensors:
            raise ValueError(f"the adapter file lacks {EMBEDDINGS_KEY!r}")
        try:
            self.prompt_encoder[name].load_saved(tensors[EMBEDDINGS_KEY])
        except ValueError as e:
            raise ValueError(f"{e}; is it an adapter for another model?" if "shape" in str(e) else str(e)) from None

    # --------------------------------------------------------- virtual tokens

    @property
    def _active(self) -> Optional[str]:
        return None if self.disabled or not self.active_adapters else self.active_adapters[0]

    def _refuse_checkpointing(self) -> None:
        # Recomputing a layer would append its keys to the cache a second time.
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            raise ValueError(
                "prefix tuning does not work with gradient checkpointing (a recomputed layer would write the "
                "key/value cache twice); call model.gradient_checkpointing_disable(), or use prompt tuning"
            )

    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def prompt_embeddings(self, batch_size: int) -> torch.Tensor:
        """The active adapter's virtual tokens for a batch: ``(batch, num_virtual_tokens, hidden)``, float32."""
        prompts = self.prompt_encoder[self.active_adapters[0]]()
        return prompts.unsqueeze(0).expand(batch_size, -1, -1)

    def prefix_cache(self, batch_size: int, cache: Any = None) -> Any:
        """A key/value cache holding the active prefix in every layer (``cache``, if given, is filled in place)."""
        name = self.active_adapters[0]
        cfg = self.peft_config[name]
        n, heads = cfg.num_virtual_tokens, cfg.num_attention_heads
        kv = self.prompt_encoder[name]().to(self._dtype())
        # Per virtual token: layer 0 key, layer 0 value, layer 1 key, ... each heads x head_dim (PEFT's layout).
        kv = kv.view(n, cfg.num_layers * 2, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)
        if cache is None:
            cache = self._new_cache()
        for layer in range(cfg.num_layers):
            k, v = (kv[2 * layer + i].unsqueeze(0).expand(batch_size, -1, -1, -1) for i in (0, 1))
            cache.update(k, v, layer)
        return cache

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers before 4.56 builds its layers lazily
            return DynamicCache()

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        name = self._active
        if name is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              labels=labels, **kwargs)
        cfg = self.peft_config[name]
        n = cfg.num_virtual_tokens
        if kwargs.get(self._cache_arg) is not None or kwargs.get("past_key_values") is not None:
            raise ValueError(
                f"{cfg.peft_type} puts its virtual tokens at the start of the sequence, so forward() takes no cache; "
                "decode step by step with generate()"
            )
        first = input_ids if input_ids is not None else inputs_embeds
        if first is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch = first.shape[0]
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"prompt methods take a 2-D attention mask (batch, tokens), got {attention_mask.dim()}-D"
                )
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        if kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are ignored by prompt methods (as in PEFT)", stacklevel=2)
            kwargs["token_type_ids"] = None
        if cfg.peft_type == PREFIX_TUNING:
            if self.model.training:
                self._refuse_checkpointing()
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            kwargs[self._cache_arg] = self.prefix_cache(batch)
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              labels=labels, **kwargs)
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored with virtual tokens in the input (as in PEFT)", stacklevel=2)
            kwargs["position_ids"] = None
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        prompts = self.prompt_embeddings(batch).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    # ------------------------------------------------------------- generation

    def generate(self, *args, **kwargs):
        """The model's ``generate`` with the active adapter's virtual tokens in place (see the module docstring)."""
        if self._active is None:
            return self.model.generate(*args, **kwargs)
        model = self.model
        own = model.__dict__.get("prepare_inputs_for_generation")
        original = model.prepare_inputs_for_generation

        def prepare_inputs_for_generation(*args, **kwargs):
            return self._with_virtual_tokens(original(*args, **kwargs))

        # generate() reads this signature to decide which inputs (inputs_embeds, ...) the model accepts.
        prepare_inputs_for_generation.__signature__ = inspect.signature(original)
        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            return model.generate(*args, **kwargs)
        finally:
            if own is None:
                del model.prepare_inputs_for_generation
            else:
                model.prepare_inputs_for_generation = own

    def _with_virtual_tokens(self, inputs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.peft_config[self.active_adapters[0]]
        n = cfg.num_virtual_tokens
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        cache = inputs.get(self._cache_arg)
        if inputs.get("use_cache") is False:
            # Without caching every step sees the whole sequence; a cache left over from the previous step
            # (the model returns the prefix cache it was given) must not be reused.
            cache = inputs[self._cache_arg] = None
        first_step = cache is None or cache.get_seq_length() == 0
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError(
                    "prompt methods generate with 2-D attention masks, i.e. the default dynamic cache; "
                    "leave cache_implementation unset"
                )
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        pos = inputs.get("position_ids")
        if pos is not None:
            # generate counts positions from the real tokens' mask; the virtual tokens come first.
            pos = pos + n
        if cfg.peft_type == PREFIX_TUNING:
            if first_step:
                inputs[self._cache_arg] = self.prefix_cache(batch, cache)
        elif first_step:
            if embeds is None:
                embeds = self.model.get_input_embeddings()(ids)
            inputs["inputs_embeds"] = torch.cat([self.prompt_embeddings(batch).to(embeds.dtype), embeds], dim=1)
            inputs["input_ids"] = None
            if pos is not None:
                virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(batch, n)
                pos = torch.cat([virtual, pos], dim=-1)
        if pos is not None:
            inputs["position_ids"] = pos
        if inputs.get("cache_position") is not None:
            # Older transformers pass explicit cache slots; recount them with the virtual tokens included.
            length = (inputs["inputs_embeds"] if inputs.get("input_ids") is None else inputs["input_ids"]).shape[1]
            past = inputs[self._cache_arg].get_seq_length() if inputs.get(self._cache_arg) is not None else 0
            inputs["cache_position"] = torch.arange(past, past + length, device=inputs["cache_position"].device)
        return inputs
