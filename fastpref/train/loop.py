"""The training loop: AdamW, warm-up + schedule, gradient accumulation, clipping, bf16 autocast,
gradient checkpointing, periodic evaluation, exact resume, DDP / FSDP2, metrics and plots.

    from fastpref.train import make_config, train
    summary = train(make_config("dpo", max_steps=20))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from fastpref.train import checkpoint, distributed, metrics, model_card, modeling, report, rl, run_dir
from fastpref.train.config import LISTWISE_LOSSES, DPOConfig, SFTConfig, TrainConfig, shown
from fastpref.train.data import Splits, StepSampler, build_splits, check_dataset_exists, collate, eval_batches
from fastpref.train.reference import ReferenceModule

log = logging.getLogger("fastpref.train")

MAX_CONSECUTIVE_SKIPS = 20
MAX_TRAIN_EVAL = 2048  # examples of the training split scored again at the end, for the summary
HHH_NOTICE = (
    "HHH alignment (Askell et al. 2021, via BIG-bench, Apache-2.0) is an EVALUATION set: this run trains on part "
    "of it only to show the loop end to end; its numbers are not a benchmark result."
)


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite weights, too many skipped steps); nothing bad was saved."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the step under way was finished, checkpoint-<step> written on every rank; the message is
    the one line the command prints."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; {path.name} saved; continue with --resume")
        self.step, self.path = step, path


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received` (the step under way finishes); one more, REPEAT_S or
    more after the first, stops at once (KeyboardInterrupt). Closer ones count as the same request: a Ctrl-C under
    torchrun reaches each worker twice, from the terminal and forwarded by torchrun's agent. Handlers are installed
    only in the main thread, and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 3.0

    def __init__(self):
        self.received: int | None = None
        self._first = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            if time.monotonic() - self._first >= self.REPEAT_S:
                raise KeyboardInterrupt
            return
        self.received, self._first = signum, time.monotonic()
        log.warning("%s: stopping after this step (once more, %g s from now, to stop at once)",
                    signal.Signals(signum).name, self.REPEAT_S)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class _TqdmHandler(logging.Handler):
    """Log lines above the progress bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except ImportError:
            print(self.format(record), file=sys.stderr)


def setup_logging(dist: distributed.Dist) -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its per-file bars would interleave with ours
    except ImportError:
        pass
    if not log.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[fastpref] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if dist.main else logging.WARNING)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _autocast_factory(config: TrainConfig, device: torch.device, fsdp: bool):
    """(context factory, bf16). Under FSDP2, bf16 is its mixed-precision policy (bf16 parameters in the forward),
    not autocast."""
    bf16 = config.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not bf16 or fsdp:
        return contextlib.nullcontext, bool(bf16)
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), True


def _param_groups(module: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name.lower() or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sft_warmup(config: DPOConfig, dist: distributed.Dist) -> DPOConfig:
    """SFT on the chosen responses of the training split; returns config pointing at its result."""
    out = Path(config.run_dir()) / "sft-warmup"
    marker = out / "warmup.json"
    spec = {"model": config.model_name_or_path, "dataset": config.dataset_name, "steps": config.sft_warmup_steps,
            "seed": config.seed, "eval_fraction": config.eval_fraction, "max_length": config.max_length}
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        common = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
        common.update(
            output_dir=str(out),
            max_steps=config.sft_warmup_steps,
            learning_rate=config.sft_warmup_learning_rate or config.learning_rate,
            resume_from_checkpoint=None,
            save_steps=None,
            eval_steps=None,
            overwrite_output_dir=True,  # a stale or interrupted warm-up of this run
        )
        log.info("SFT warm-up: %d steps on the chosen responses -> %s", config.sft_warmup_steps, out)
        train(SFTConfig(**common))
        if dist.main:
            marker.write_text(json.dumps(spec))
        dist.barrier()
    else:
        log.info("SFT warm-up found in %s: reusing it", out)
    return dataclasses.replace(config, model_name_or_path=str(out), tokenizer_name_or_path=None, sft_warmup_steps=0)


class Trainer:
    def __init__(self, config: TrainConfig, run: run_dir.RunDir | None = None):
        self.config = c = config
        self.dist = dist = distributed.init()
        setup_logging(dist)
        self.run = run or start(c, dist)
        self.run_dir = self.run.path
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        set_seed(c.seed)
        self.task = c.task
        self.listwise = isinstance(c, DPOConfig) and c.loss in LISTWISE_LOSSES
        self.start_model = c.model_name_or_path

        self.fsdp = c.fsdp and dist.enabled
        if c.fsdp and not dist.enabled:
            log.info("--fsdp on one process: nothing to shard, the model stays whole")

        # rank 0 loads the model; the other ranks build it empty (meta device) and receive its weights when placed
        loaded = distributed.load_on_main(lambda: modeling.load_model_and_tokenizer(
            c.model_name_or_path, self.task, c.seed, c.tokenizer_name_or_path), dist)
        self.tokenizer = loaded.tokenizer
        model = loaded.model if loaded.model is not None and not self.fsdp else loaded.empty()
        if c.disable_dropout:
            modeling.disable_dropout(model)
        if self.task != "reward":
            modeling.head_of(model)  # a clear error now for a model without a usable LM head
        self.splits: Splits = (rl.build_prompt_splits(c, self.tokenizer) if self.task in rl.RL_TASKS
                               else build_splits(c, self.tokenizer, self.task, self.listwise))
        if c.dataset_name == "hhh":
            log.info(HHH_NOTICE)
        for note in self.splits.notes:
            log.info(note)
        self.device = dist.device
        self.autocast, self.bf16 = _autocast_factory(c, self.device, self.fsdp)
        needs_reference = isinstance(c, DPOConfig) and c.needs_reference()
        if needs_reference and c.precompute_ref_log_probs:  # keyed on the starting weights, before any adapter
            ref_key = self._reference_key(loaded)
        self.adapter_base = None
        if c.use_peft:
            from fastpref.train import lora

            self.adapter_base = dist.from_main(lambda: lora.base_for_adapters(
                model, self.tokenizer, c.model_name_or_path, self.task, self.run_dir))
            model = lora.apply(model, c, self.task)
        if c.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model
        module_cls = rl.PolicyModule if self.task in rl.RL_TASKS else modeling.MODULES[self.task]
        self.module = module_cls(model.get_base_model() if c.use_peft else model, c)
        self.module.train()
        self.wrapped = self._place(self.module, loaded.model)

        # reference: precomputed once (cached on disk) or a live frozen copy; none for reference-free losses
        self.ref_model, self.ref_logps, self.reference = None, None, {"kind": "none"}
        if needs_reference:
            if c.precompute_ref_log_probs:
                self.ref_logps, hit, path = self._precompute(loaded, ref_key)
                log.info("reference log-probs: %s %s", "cache hit" if hit else "computed and cached in", path)
                self.reference = {"kind": "precomputed", "cache": "hit" if hit else "miss", "path": str(path)}
            elif c.use_peft:
                self.reference = {"kind": "adapters disabled"}  # the base model, as TRL: no second copy
            else:
                self.ref_model = self._live_reference(loaded)
                self.reference = {"kind": "live"}
        elif self.task in rl.RL_TASKS and getattr(c, "beta", 0.0) != 0.0:  # grpo / rloo: a live reference
            self.ref_model = self._policy_reference(loaded)
            self.reference = {"kind": "live"}
        loaded.model = None  # under FSDP2, rank 0's full copy goes now

        from transformers import get_scheduler

        # fused: one kernel per parameter group and no parameter-sized temporaries (TRL's default, adamw_torch_fused)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.module, c.weight_decay), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon, fused=self.device.type in ("cpu", "cuda"),
        )
        self.rl = rl.RLStage(self) if self.task in rl.RL_TASKS else None  # rollouts, rewards, reference
        self.sampler = self.rl.sampler if self.rl else StepSampler(
            len(self.splits.train), c.per_device_train_batch_size, dist.world, c.gradient_accumulation_steps, c.seed)
        spe = self.sampler.steps_per_epoch
        self.total_steps = c.max_steps if c.max_steps > 0 else max(1, math.ceil(c.num_train_epochs * spe))
        ratio = c.warmup_steps if 0 < c.warmup_steps < 1 else c.warmup_ratio  # warmup_steps < 1: a ratio (TRL)
        warmup = int(c.warmup_steps) if c.warmup_steps >= 1 else math.ceil(ratio * self.total_steps)
        self.scheduler = get_scheduler(c.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)
        self.metrics_log = metrics.JsonLog(self.run_dir / "metrics.jsonl", dist.main)
        if dist.main and report.check(c.report_to):
            name = c.run_name or str(self.run_dir)
            self.metrics_log.listeners.append(report.Reporter(c.report_to, self.run_dir, name, dataclasses.asdict(c)))
        self.global_step = 0
        self.num_tokens = 0  # every process's attention-mask tokens trained on so far (TRL's num_tokens)
        self.saved_step = None  # the step of the checkpoint this run wrote last
        self.last_logged: dict = {}  # the last metrics row, for a checkpoint's model card

    # --- placement and reference ---

    def _place(self, module: torch.nn.Module, source: torch.nn.Module | None) -> torch.nn.Module:
        """Shard (FSDP2) or replicate (DDP) `module`, whose `.model` is empty except on rank 0 (`source`)."""
        dist = self.dist
        if self.fsdp:
            wrapped = distributed.wrap(module, dist, True, bf16=self.bf16)
            distributed.fill_sharded(module.model, source, dist)
            return wrapped
        if module.model is not source:  # a DDP rank other than 0: DDP's constructor copies rank 0's weights in
            distributed.materialize(module.model, dist.device)
        module.to(dist.device)
        return distributed.wrap(module, dist, False)

    def _sharded_reference(self, loaded: distributed.Loaded, make=None) -> torch.nn.Module:
        """A frozen copy of the starting model in the module `make(model)` builds (default: a ReferenceModule),
        sharded like the policy (FSDP2, same mixed precision)."""
        empty = loaded.empty()
        ref = (make(empty) if make else ReferenceModule(empty, self.config.ld_alpha)).requires_grad_(False)
        self._place(ref, loaded.model)
        return ref.eval()

    def _live_reference(self, loaded: distributed.Loaded) -> torch.nn.Module:
        if self.fsdp:
            return self._sharded_reference(loaded)
        return ReferenceModule(modeling.frozen_copy(self.model), self.config.ld_alpha).eval()

    def _policy_reference(self, loaded: distributed.Loaded) -> torch.nn.Module:
        """The RL stage's reference: a frozen copy of the starting policy in a PolicyModule (its passes go through
        the same forward as the policy's), sharded like the policy under FSDP2."""
        make = lambda model: rl.PolicyModule(model, self.config)  # noqa: E731
        if self.fsdp:
            return self._sharded_reference(loaded, make)
        return make(modeling.frozen_copy(self.model)).eval()

    def _reference_key(self, loaded: distributed.Loaded) -> str:
        """The reference cache's key, from rank 0's starting weights and the dtype the pass computes in."""
        from fastpref.train.reference import autocast_dtype, cache_key

        dtype = autocast_dtype(self.autocast, self.device) or (torch.bfloat16 if self.bf16 else None)
        return self.dist.from_main(
            lambda: cache_key(loaded.model, self.splits, self.tokenizer, self.config.ld_alpha, dtype)
        )

    def _adapters_off(self):
        """The base model's forward under LoRA (the adapters disabled, as TRL's reference); else nothing."""
        return self.model.disable_adapter() if self.config.use_peft else contextlib.nullcontext()

    def _precompute(self, loaded: distributed.Loaded, key: str):
        c = self.config
        from fastpref.train.reference import precomputed

        make_scorer = (lambda: self._sharded_reference(loaded)) if self.fsdp else (
            lambda: ReferenceModule(self.model, c.ld_alpha))
        with self._adapters_off():
            return precomputed(
                key, make_scorer, self.splits, self.tokenizer, cache_dir=c.ref_cache_dir,
                batch_size=c.precompute_ref_batch_size or c.per_device_eval_batch_size, device=self.device,
                autocast=self.autocast, dist=self.dist, collective=self.fsdp,
            )

    def _with_reference(self, batch: dict, split: str) -> dict:
        if self.ref_logps is not None:
            ref = self.ref_logps[split][batch["index"].cpu()]
            batch["ref_chosen"], batch["ref_rejected"] = ref[:, 0].to(self.device), ref[:, 1].to(self.device)
        elif self.ref_model is not None or self.reference["kind"] == "adapters disabled":
            with torch.no_grad(), self.autocast(), self._adapters_off():
                ref = (self.ref_model(batch) if self.ref_model is not None else
                       modeling.sequence_logps(self.module.model, batch, ld_alpha=self.config.ld_alpha)).float()
            batch["ref_chosen"], batch["ref_rejected"] = ref.chunk(2)
        return batch

    def _batch(self, examples, indices, split):
        batch = collate([examples[i] for i in indices], self.tokenizer.pad_token_id, listwise=self.listwise)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self._with_reference(batch, split)

    # --- memory report ---

    def head_memory_report(self) -> dict | None:
        """Peak memory of the loss head alone (forward + backward) on one training batch, beside the
        textbook head's N x V logits + fp32 log_softmax computed from the same shapes."""
        if self.task == "reward" or self.fsdp or self.rl:
            return None
        examples = self.splits.train
        indices = self.sampler.micro_batches(0, 0)[0]
        batch = self._batch(examples, indices, "train")
        with torch.no_grad(), self.autocast():
            hidden = modeling.hidden_states(self.model, batch["input_ids"], batch["attention_mask"]).detach()
        head = modeling.head_of(self.model)
        weight = head.weight.detach().to(hidden.dtype).requires_grad_()
        hidden = hidden.requires_grad_()
        labels = batch["labels"][:, 1:]
        import fastpref

        with metrics.PeakMeter(self.device) as meter:
            if self.task == "dpo" and self.config.loss == "dpo":
                out, _stats = fastpref.linear_dpo_loss(
                    hidden, weight, labels, batch.get("ref_chosen"), batch.get("ref_rejected"),
                    beta=self.config.beta, loss_type=self.config.loss_type[0] if len(self.config.loss_type) == 1
                    else self.config.loss_type, reference_free=self.config.reference_free,
                    label_smoothing=self.config.label_smoothing, softcap=head.softcap, logit_scale=head.logit_scale,
                    memory_budget=self.config.memory_budget, return_stats=modeling.DPO_STATS,
                )
                out.loss.backward()
            else:
                fastpref.linear_sequence_logps(
                    hidden, weight, labels, softcap=head.softcap, logit_scale=head.logit_scale
                ).sum().backward()
        rows, positions = labels.shape
        vocab = weight.shape[0]
        report = {
            "head_peak_mb": meter.mb,
            "textbook_head_mb": metrics.textbook_head_mb(rows, positions, vocab, hidden.dtype),
            "rows": rows, "positions": positions, "vocab": vocab, "hidden": weight.shape[1],
            "scored_tokens": int((labels != -100).sum()),
        }
        dtype = str(hidden.dtype).removeprefix("torch.")
        del hidden, weight
        measured = "n/a" if report["head_peak_mb"] is None else f"{report['head_peak_mb']:.1f} MB"
        log.info(
            "loss head, one batch (%d sequences x %d positions, vocab %d): fastpref peak %s (fwd+bwd, measured); "
            "textbook path %.1f MB (N x V logits in %s + fp32 log_softmax, from shapes)",
            rows, positions, vocab, measured, report["textbook_head_mb"], dtype,
        )
        return report

    # --- evaluation ---

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> dict[str, float]:
        # the end-of-run pass over the training split is capped: it reports, it does not train
        if self.rl:
            return self.rl.evaluate(split)
        examples = self.splits.eval if split == "eval" else self.splits.train[:MAX_TRAIN_EVAL]
        if not examples:
            return {}
        c, dist = self.config, self.dist
        sharded = not self.fsdp  # FSDP: every rank runs every batch (forward is collective), counted once
        rank, world = (dist.rank, dist.world) if sharded else (0, 1)
        acc = metrics.Accumulator()
        self.module.eval()
        for indices in eval_batches(len(examples), c.per_device_eval_batch_size, rank, world):
            batch = self._batch(examples, indices, split)
            with self.autocast():
                _, values = self.module(batch)
            acc.add(values)
        self.module.train()
        reduced = acc.reduce(dist if sharded else distributed.Dist())
        prefix = "eval_" if split == "eval" else "train_eval_"
        return {f"{prefix}{k}": v for k, v in reduced.items()} | {f"{prefix}samples": len(examples)}

    # --- training ---

    def _resume(self) -> None:
        c = self.config
        path = checkpoint.resolve(self.run_dir, c.resume_from_checkpoint)
        state = checkpoint.load(path, self.model, self.optimizer, self.scheduler, self.dist)
        if state["data_position"]["global_batch"] != self.sampler.global_batch:
            log.warning("resuming a checkpoint of global batch %d with global batch %d: the data order differs",
                        state["data_position"]["global_batch"], self.sampler.global_batch)
        elif state.get("world_size") != self.dist.world:
            log.info("resuming a %s-process checkpoint on %d processes: same batches, new per-process random streams",
                     state.get("world_size"), self.dist.world)
        self.global_step = state["global_step"]
        self.num_tokens = state.get("num_tokens", 0)
        self._apply_options()
        self.metrics_log.truncate(self.global_step)
        log.info("resumed from %s at step %d (epoch %.2f)", path, self.global_step, state.get("epoch", 0))

    def _apply_options(self) -> None:
        """After a checkpoint is loaded, this run's optimizer options and learning rate are the ones in force
        (the loaded optimizer and scheduler states hold the checkpoint's)."""
        c = self.config
        for group, decay in zip(self.optimizer.param_groups, (c.weight_decay, 0.0)):
            group.update(weight_decay=decay, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                         initial_lr=c.learning_rate)
        self.scheduler.base_lrs = [c.learning_rate] * len(self.optimizer.param_groups)
        self.scheduler.last_epoch -= 1
        self.scheduler.step()  # this run's schedule at the resumed step

    def _state(self) -> dict:
        spe = self.sampler.steps_per_epoch
        return {"global_step": self.global_step, "epoch": self.global_step / spe,
                "data_position": {"epoch": self.global_step // spe, "batch": self.global_step % spe,
                                  "global_batch": self.sampler.global_batch, "seed": self.config.seed},
                "total_steps": self.total_steps, "task": self.task, "model": self.start_model,
                "num_tokens": self.num_tokens, **self.run.trainer_state()}

    def _card(self, results: dict, what: str) -> str:
        return model_card.render(self.config, self.adapter_base or self.start_model, results, what, self.global_step,
                                 self.reference, peft=self.config.use_peft)

    def _save(self) -> Path:
        path = checkpoint.save(self.run_dir, self.global_step, self.model, self.optimizer, self.scheduler,
                               self._state(), self.dist, tokenizer=self.tokenizer,
                               card=self._card(self.last_logged, f"checkpoint {self.global_step}"),
                               adapter_base=self.adapter_base)
        self.saved_step = self.global_step
        if self.dist.main:
            checkpoint.prune(self.run_dir, self.config.save_total_limit, self.run.run_id)
        return path

    def _loss_units(self, batch: dict) -> torch.Tensor:
        """What the task's loss averages over: completion tokens for SFT, examples (pairs, rankings) else."""
        if self.task == "sft":
            return (batch["labels"][:, 1:] != -100).sum()
        return torch.tensor(batch["index"].numel(), device=self.device)

    def _step(self) -> tuple[dict, bool]:
        """One optimizer step over the accumulated micro-batches -> (local metrics, skipped).

        Each micro-batch's loss (a mean over its own units) is weighted by its share of the units of the
        whole accumulated batch on every rank, as transformers' `num_items_in_batch`: for SFT, batch 2 x
        accumulation 2 then optimises what batch 4 x 1 does, the mean over all the step's tokens."""
        dist = self.dist
        if self.rl:
            return self.rl.step()
        acc = metrics.Accumulator()
        micro_batches = [self._batch(self.splits.train, indices, "train")
                         for indices in self.sampler.micro_batches(self.global_step, dist.rank)]
        units = [self._loss_units(batch) for batch in micro_batches]
        step_units = max(float(dist.sum(torch.stack(units).sum())), 1.0)
        skipped = False
        tokens = 0
        for i, batch in enumerate(micro_batches):
            tokens += int(batch["attention_mask"].sum())
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss, values = self.wrapped(batch)
                if dist.any(not bool(torch.isfinite(loss.detach()))):
                    skipped = True
                    break
                # DDP / FSDP average the gradients over ranks: the world size undoes that average
                (loss * (units[i] * dist.world / step_units)).backward()
            acc.add(values)
        grad_norm, skipped = self.update(skipped)
        return {"acc": acc, "grad_norm": grad_norm, "tokens": tokens}, skipped

    def update(self, skipped: bool) -> tuple[float, bool]:
        """The end of an optimizer step: clip and step unless the step is skipped (a non-finite loss, or a
        non-finite gradient norm found here), then zero the gradients and advance the schedule either way.
        Returns (grad_norm, skipped)."""
        c = self.config
        grad_norm = float("nan")
        if not skipped:
            max_norm = c.max_grad_norm if c.max_grad_norm and c.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
            skipped = not math.isfinite(grad_norm)
            if not skipped:
                self.optimizer.step()
                self._check_weights()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm, skipped

    def _check_weights(self) -> None:
        """Stop, before anything is saved, when an update left a non-finite weight."""
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self.module.parameters()]
        if not self.dist.any(not math.isfinite(torch.nn.utils.get_total_norm(local))):
            return
        last = checkpoint.latest(self.run_dir)
        raise TrainingStopped(
            f"step {self.global_step + 1}: the optimizer step left non-finite weights (learning rate "
            f"{self.scheduler.get_last_lr()[0]:g}, weight decay {self.config.weight_decay:g}); stopped without "
            f"saving them. Last checkpoint: {last or 'none'}"
        )

    def fit(self) -> dict:
        c, dist = self.config, self.dist
        if c.resume_from_checkpoint:
            self._resume()
        if dist.main:
            (self.run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(c), indent=1))
        with StopSignals() as signals:
            self._train_steps(signals)
        return self._finish()

    def _train_steps(self, signals: StopSignals) -> None:
        """The optimizer steps from global_step to total_steps; on SIGINT / SIGTERM (on any rank) every rank stops
        after the same step, writes checkpoint-<step> and raises TrainingInterrupted."""
        c, dist = self.config, self.dist
        spe = self.sampler.steps_per_epoch
        log.info(
            "%s: %d train / %d eval examples, %d steps (%d per epoch, global batch %d = %d x %d processes x %d "
            "accumulation), lr %g, device %s%s",
            self.task, len(self.splits.train), len(self.splits.eval), self.total_steps, spe, self.sampler.global_batch,
            c.per_device_train_batch_size, dist.world, c.gradient_accumulation_steps, c.learning_rate, self.device,
            ("" if not self.bf16 else ", bf16 FSDP2 mixed precision" if self.fsdp else ", bf16 autocast"),
        )
        self.summary = {"task": self.task, "model": self.start_model, "reference": self.reference}
        if dist.main and self.global_step == 0:
            report = self.head_memory_report()
            if report:
                self.summary["head_memory"] = report
        if self.rl and c.eval_steps and self.global_step == 0 and self.splits.eval:  # the reward before training
            row = {"step": 0, "epoch": 0.0} | self.evaluate()
            self.metrics_log.write(row)
            _log_eval(row)
        window = metrics.Accumulator()
        throughput = metrics.Throughput()
        window_norms, skips_in_row, skipped_total = [], 0, 0
        start = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not dist.main or c.disable_tqdm,
                   desc=f"{self.task}", dynamic_ncols=True, file=sys.stderr)
        while self.global_step < self.total_steps:
            out, skipped = self._step()
            self.num_tokens += int(dist.sum(torch.tensor(float(out["tokens"]))).item())
            self.global_step += 1
            if not skipped:  # this step's values, drawn by this update (not the next one)
                bar.set_postfix(_postfix(out["acc"].local()), refresh=False)
            bar.update(1)
            if skipped:
                skips_in_row += 1
                skipped_total += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", self.global_step)
                if skips_in_row >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingStopped(
                        f"{skips_in_row} consecutive steps had a non-finite loss or gradient; lower --learning_rate "
                        "or check the data (empty completions, extreme lengths)"
                    )
            else:
                skips_in_row = 0
                window.merge(out["acc"])
                window_norms.append(out["grad_norm"])
                throughput.add(out["tokens"])
            if self.global_step % c.logging_steps == 0 or self.global_step == self.total_steps:
                row = {"step": self.global_step, "epoch": round(self.global_step / spe, 4)}
                row.update(window.reduce(dist))
                row["grad_norm"] = sum(window_norms) / len(window_norms) if window_norms else None
                row["learning_rate"] = self.scheduler.get_last_lr()[0]
                row["num_tokens"] = self.num_tokens
                tokens_per_s = dist.sum(torch.tensor(throughput.rate())).item()
                row["tokens_per_second"] = round(tokens_per_s, 1)
                row["peak_memory_mb"] = _round(metrics.peak_memory_mb(self.device))
                row["elapsed_s"] = round(time.perf_counter() - start, 2)
                if skipped_total:
                    row["skipped_steps"] = skipped_total
                self.metrics_log.write(row)
                self.last_logged = row
                window_norms = []
            if c.eval_steps and self.global_step % c.eval_steps == 0 and self.global_step < self.total_steps \
                    and self.splits.eval:
                row = {"step": self.global_step, "epoch": round(self.global_step / spe, 4)} | self.evaluate()
                self.metrics_log.write(row)
                _log_eval(row)
            if c.save_steps and self.global_step % c.save_steps == 0:
                self._save()
            if dist.any(signals.received is not None):  # every rank agrees, so all stop after the same step
                bar.close()
                path = self._save() if self.saved_step != self.global_step else checkpoint.checkpoint_path(
                    self.run_dir, self.global_step)
                self.metrics_log.close()
                raise TrainingInterrupted(self.global_step, path)
        bar.close()
        self.train_seconds = time.perf_counter() - start

    def _finish(self) -> dict:
        """Final evaluation, the model (with its card) into output_dir, summary and plots."""
        c, dist, summary = self.config, self.dist, self.summary
        spe = self.sampler.steps_per_epoch
        final = {"step": self.global_step, "epoch": round(self.global_step / spe, 4)} | self.evaluate()
        if c.task != "sft" and self.splits.eval:
            self.metrics_log.write(final)
            _log_eval(final)
        train_eval = self.evaluate("train")
        self._save_final(self._card({**self.last_logged, **final, **train_eval}, "final model"))
        summary.update(final)
        summary.update(train_eval)
        if self.rl and dist.main:
            summary.update(rl.reward_curve_summary(metrics.read_jsonl(self.run_dir / "metrics.jsonl")))
        summary["train_seconds"] = round(self.train_seconds, 1)
        summary["steps"] = self.global_step
        self.metrics_log.close()
        if dist.main:
            (self.run_dir / "summary.json").write_text(metrics.to_json(summary))
            if c.plot:
                try:
                    paths = metrics.plot(self.run_dir / "metrics.jsonl", self.run_dir / "plots",
                                         title=f"fastpref train {self.task} ({self.start_model})")
                    log.info("plots: %s", self.run_dir / "plots" / "curves.png" if paths else "none")
                except ImportError:
                    log.warning("matplotlib is not installed: no plots (pip install fastpref[train])")
        return summary

    def _save_final(self, card: str) -> None:
        """The model + config + tokenizer into output_dir, for from_pretrained (hard links to a checkpoint this run
        wrote of the same step); under LoRA the adapter, for peft's from_pretrained."""
        if self.config.use_peft:  # the adapter (peft's save_pretrained, as TRL); LoRA runs are never sharded
            if self.dist.main:
                from fastpref.train.lora import save_adapter

                save_adapter(self.model, self.run_dir, self.adapter_base)
                self.tokenizer.save_pretrained(self.run_dir)
                (self.run_dir / "README.md").write_text(card, encoding="utf-8")
            self.dist.barrier()
        else:
            same = self.run_dir / f"checkpoint-{self.global_step}" if self.saved_step == self.global_step else None
            checkpoint.export(self.run_dir, self.model, self.tokenizer, self.dist, same, card)
        log.info("model saved to %s", self.run_dir)


def _round(x):
    return None if x is None else round(x, 1)


def _postfix(values: dict) -> dict:
    out = {}
    if "loss" in values:
        out["loss"] = f"{values['loss']:.4f}"
    for name, short in (("rewards/accuracies", "acc"), ("mean_token_accuracy", "tok_acc"), ("rewards/margins", "margin")):
        if name in values:
            out[short] = f"{values[name]:.3f}"
    return out


def _log_eval(row: dict) -> None:
    parts = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in row.items()
             if k.startswith("eval_") and k != "eval_samples" and isinstance(v, float)
             and k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_mean_token_accuracy",
                       "eval_reward", "eval_reward_sem", "eval_kl")]
    log.info("step %d held-out (%s examples): %s", row["step"], row.get("eval_samples"), ", ".join(parts))


def start(config: TrainConfig, dist: distributed.Dist) -> run_dir.RunDir:
    """What can be checked before a model loads, then the output directory claimed for this run."""
    if config.fsdp and not dist.enabled:
        raise ValueError("--fsdp shards the model over processes: launch 2 or more with torchrun "
                         "(torchrun --nproc_per_node N -m fastpref.cli train ...)")
    check_dataset_exists(config.dataset_name)
    out = Path(config.run_dir()).resolve()
    for option, value in (("--model", config.model_name_or_path), ("--tokenizer_name_or_path",
                          config.tokenizer_name_or_path), ("--dataset", config.dataset_name)):
        if value and Path(value).exists() and (Path(value).resolve() == out or out in Path(value).resolve().parents):
            raise ValueError(f"{option} {value} lies in --output_dir {config.run_dir()}, where this run writes: "
                             "choose another --output_dir")
    return run_dir.claim(config, dist)


def train(config: TrainConfig) -> dict:
    """Run one training job (in this process, or as one rank of a torchrun group); returns its summary."""
    dist = distributed.init()
    setup_logging(dist)
    applied = getattr(config, "preset_applied", {})
    if applied:
        log.info("preset --model %s sets: %s (an option you give wins; `fastpref train %s --list_presets`)",
                 config.model_name_or_path, ", ".join(f"--{name} {shown(value)} (default {shown(default)})"
                                                      for name, (default, value) in applied.items()), config.task)
    run = start(config, dist)
    try:
        if config.task in rl.RL_TASKS:
            config = rl.starting_policy(config)
        if getattr(config, "sft_warmup_steps", 0) > 0:  # dpo, grpo
            config = _sft_warmup(config, dist)
        return Trainer(config, run).fit()
    finally:
        run.release()
