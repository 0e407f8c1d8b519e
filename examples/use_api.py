"""The README's "Use" block, runnable on a CPU: per-token and per-sequence log-probs from logits or from hidden
states and the LM head, and the DPO loss (plain and fused) on random tensors.

    python examples/use_api.py
"""

import torch

import fastpref

torch.manual_seed(0)
B, T, H, V = 2, 16, 64, 1000  # pairs, positions, hidden size, vocabulary
lm_head = torch.nn.Linear(H, V, bias=False)
hidden = torch.randn(2 * B, T, H, requires_grad=True)  # chosen rows, then their rejected twins
labels = torch.randint(0, V, (2 * B, T))
labels[:, :4] = -100  # the prompt: not scored
logits = hidden @ lm_head.weight.T

logps = fastpref.token_logps(logits, labels)  # (2B, T); 0 where labels == -100
seq = fastpref.sequence_logps(logits, labels, reduction="sum")  # (2B,)
seq_fused = fastpref.linear_sequence_logps(hidden, lm_head.weight, labels)  # no (N, V) tensor
torch.testing.assert_close(seq_fused, seq, rtol=1e-4, atol=1e-4)

policy_chosen, policy_rejected = seq.chunk(2)
with torch.no_grad():
    ref_chosen, ref_rejected = (seq + 0.1 * torch.randn_like(seq)).chunk(2)  # stands in for a reference model
out = fastpref.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid")
out.loss.backward()

fused = fastpref.linear_dpo_loss(hidden, lm_head.weight, labels, ref_chosen, ref_rejected, beta=0.1)
torch.testing.assert_close(fused.loss, out.loss, rtol=1e-4, atol=1e-5)
print(f"DPO loss {out.loss.item():.4f} (fused {fused.loss.item():.4f}); "
      f"rewards/chosen {out.chosen_rewards.tolist()}")
