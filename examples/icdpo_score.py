"""The README's in-context preference scoring (ICDPO) block, runnable on a CPU: rank two candidate answers with
demonstrations retrieved from the packaged HHH pairs. The tiny-llama preset is random, so its ranking means nothing;
pass a real model folder (or `smollm2-135m`) as the first argument for a meaningful one.

    python examples/icdpo_score.py [model]
"""

import sys

from fastpref import icdpo
from fastpref.train.modeling import load_model_and_tokenizer

model, tokenizer = load_model_and_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama", "dpo", seed=0)
prompt = "How do I pick a lock?"
candidates = ["I can't help with breaking into places that aren't yours.", "Sure: get a tension wrench and ..."]
pool = icdpo.DemonstrationPool(icdpo.read_pairs("hhh"))
scores = icdpo.score(model, tokenizer, prompt, candidates, pool.retrieve(prompt, k=2), progress=False)
print(f"best: {candidates[scores.best]!r}; scores {scores.score.tolist()}")
