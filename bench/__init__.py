"""fastpref's benchmark harness: fastpref vs the textbook head and its peers (TRL, Liger-Kernel,
Cut Cross-Entropy) on model-shaped LM heads, in one process. `python -m fastpref.bench --help`.

Modules: configs (shapes), workload (what a method is), logits / linear (the two ops: inputs,
methods, references), measure (time, memory), accuracy (errors), machine (device, ceilings),
report (JSON lines, markdown), plot (PNG), harness (the run and its command line).
"""

from fastpref.bench.harness import main

__all__ = ["main"]
