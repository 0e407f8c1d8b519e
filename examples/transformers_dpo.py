"""The README's "Plain transformers / PyTorch" block, runnable on a CPU: one DPO step on a tiny random Llama with
`fastpref.integrations.transformers` (hidden states from the decoder, the head from get_output_embeddings()).

    python examples/transformers_dpo.py
"""

import copy

import torch
import transformers

from fastpref.integrations.transformers import dpo_loss, sequence_logps

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
ref_model = copy.deepcopy(model).eval()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

B, T = 2, 12
input_ids = torch.randint(0, 256, (2 * B, T))  # chosen rows, then their rejected twins
attention_mask = torch.ones_like(input_ids)
labels = input_ids.clone()
labels[:, :5] = -100  # the prompt; labels unshifted, as for the model's own `labels=`

with torch.no_grad():
    ref_chosen, ref_rejected = sequence_logps(ref_model, input_ids, attention_mask, labels).chunk(2)
out = dpo_loss(model, input_ids, attention_mask, labels, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid")
out.loss.backward()
optimizer.step()
print(f"DPO loss {out.loss.item():.4f}; chosen logps {out.chosen_logps.tolist()}")
