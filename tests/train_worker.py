"""One process of a `fastpref train` torchrun job in tests/test_train_distributed.py, with probes it writes to
OUTPUT_DIR/probes_rank<r>.json for the test to read:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_worker.py dpo --model ... --output_dir OUT

- "save" / "load": host memory of each checkpoint save and load, in MB: the RSS before the call and the rise of the
  RSS high-water mark over it during the call (Linux: /proc/self/status, the peak reset by /proc/self/clear_refs).
- "startup": the RSS when the Trainer starts and its high-water mark once it is built (model loaded and placed).
- "forward": the dtype of a decoder layer's weight and of the reference log-probs as the policy's forward sees them,
  and the type of the live reference's head weight after its forward (DTensor: resharded; Tensor: still gathered).
- "sample" (RL tasks): per call of RLStage.sample, the all-gathers it made (FSDP2 gathering weights) and the
  policy's forwards (one per new token), and whether the policy's weights were resharded after it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as tdist

from fastpref.train import checkpoint, loop, rl
from fastpref.train.config import parse_config
from fastpref.train.distributed import init, shutdown

PROBES: dict = {"save": [], "load": [], "forward": {}, "sample": []}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _measured(name: str, fn):
    def wrapper(*args, **kwargs):
        _reset_peak()
        before = _status_mb("VmRSS")
        out = fn(*args, **kwargs)
        PROBES[name].append({"rss_mb": round(before, 1), "peak_rise_mb": round(_status_mb("VmHWM") - before, 1)})
        return out

    return wrapper


def _trainer_init(original):
    def wrapper(self, config, *args):
        _reset_peak()
        before = _status_mb("VmRSS")
        original(self, config, *args)
        PROBES["startup"] = {"rss_mb": round(before, 1), "peak_mb": round(_status_mb("VmHWM"), 1)}
        layer = loop.distributed._decoder_layers(self.module)[0]
        linear = next(m for m in layer.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
        linear.register_forward_pre_hook(lambda m, a: PROBES["forward"].update(weight=str(m.weight.dtype)))

        def batch_dtypes(module, args):
            if "ref_chosen" in args[0]:
                PROBES["forward"]["ref_chosen"] = str(args[0]["ref_chosen"].dtype)

        self.module.register_forward_pre_hook(batch_dtypes)
        if self.ref_model is not None:  # runs after FSDP2's own post-forward hook, registered before it
            head = self.ref_model.model.get_output_embeddings()
            self.ref_model.register_forward_hook(lambda m, a, out: PROBES["forward"].update(
                reference_head_after_forward=type(head.weight).__name__))

    return wrapper


def _sample(original):
    def wrapper(self, *args, **kwargs):
        counts = {"all_gathers": 0, "forwards": 0}
        patched = {}
        for name in ("all_gather_single", "all_gather_into_tensor"):  # what FSDP2's all-gather calls
            if hasattr(tdist, name):
                patched[name] = getattr(tdist, name)

                def counting(*a, _fn=patched[name], **k):
                    counts["all_gathers"] += 1
                    return _fn(*a, **k)

                setattr(tdist, name, counting)
        hook = self.trainer.model.get_output_embeddings().register_forward_hook(
            lambda *_: counts.update(forwards=counts["forwards"] + 1))
        try:
            return original(self, *args, **kwargs)
        finally:
            hook.remove()
            for name, fn in patched.items():
                setattr(tdist, name, fn)
            layer = loop.distributed._decoder_layers(self.trainer.module)[0]
            weight = next(p for p in layer.parameters() if p.dim() == 2)
            PROBES["sample"].append({**counts, "layer_weight_after": type(weight).__name__})

    return wrapper


def main(argv: list[str]) -> None:
    checkpoint.save = _measured("save", checkpoint.save)
    checkpoint.load = _measured("load", checkpoint.load)
    loop.Trainer.__init__ = _trainer_init(loop.Trainer.__init__)
    rl.RLStage.sample = _sample(rl.RLStage.sample)
    config = parse_config(argv[0], argv[1:])
    dist = init()
    code = 0
    try:
        loop.train(config)
        Path(config.output_dir, f"probes_rank{dist.rank}.json").write_text(json.dumps(PROBES, indent=1))
    except loop.TrainingInterrupted as e:  # SIGINT / SIGTERM: what `fastpref train` prints and its exit status
        print(f"rank {dist.rank}: {e}", flush=True)
        code = 130
    finally:
        shutdown(dist)
    # and leaves as the CLI does, without the interpreter's finalization (where gloo jobs that had finished
    # aborted: SIGABRT, "terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
