"""Adapters that put fastpref under code people already run.

- `fastpref.integrations.trl`: `patch(trainer)` makes a TRL 1.16 SFT, DPO, KTO, GRPO or RLOO trainer
  take its per-token log-probs and statistics from fastpref (needs `trl`).
- `fastpref.integrations.transformers`: `sequence_logps` / `dpo_loss` on any transformers causal LM
  (every family's logit softcap and scale, `fastpref.model_head`), hidden states × head without the logits.

Each is imported on its own (`import fastpref.integrations.trl`), so neither needs the other's package.
"""
