"""The TRL patch's head under FSDP2 (`fully_shard`), 2 CPU processes (gloo), each on its own batch: log-probs,
entropy and every parameter's gradient equal one unsharded process's on the mean of both objectives, with the
LM head in the root's shard group and with the head sharded on its own (then its weight stays a DTensor through
the model's forward, which never calls the head: TRL 1.16's `full_tensor()` gives it a wrong gradient there)."""

from __future__ import annotations

import os
import socket
import types

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LAYOUTS = ("head in the root's group", "head sharded on its own")


def _patched(model):
    from fastpref.integrations import trl as fastpref_trl

    contract = fastpref_trl.HeadContract(("entropy",))
    model.forward = types.MethodType(fastpref_trl._fused_forward(model, contract, model.forward), model)
    return model


def _objective(model, ids):
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 3, -100)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    return (out.log_probs * torch.linspace(0.5, 1.5, ids.shape[1] - 1)).sum() + 0.3 * out.entropy.sum(), out


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import transformers
        from test_train import tiny_config
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        config = tiny_config("llama")
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randint(3, config.vocab_size, (2, 10), generator=generator) for _ in range(WORLD)]
        torch.manual_seed(0)
        reference = _patched(transformers.AutoModelForCausalLM.from_config(config))
        expected_outputs = [_objective(reference, ids)[1] for ids in batches]
        (sum(_objective(reference, ids)[0] for ids in batches) / WORLD).backward()
        for layout in LAYOUTS:
            model = transformers.AutoModelForCausalLM.from_config(config)
            model.load_state_dict(reference.state_dict())
            _patched(model)
            if layout == "head sharded on its own":
                fully_shard(model.lm_head)
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            with torch.no_grad():  # a reference model's forward: no backward reshards a head of its own, so it does
                _objective(model, batches[rank])
            if layout == "head sharded on its own":
                assert isinstance(model.lm_head.weight, DTensor)
            objective, out = _objective(model, batches[rank])
            objective.backward()
            torch.testing.assert_close(out.log_probs, expected_outputs[rank].log_probs.detach(), msg=layout)
            torch.testing.assert_close(out.entropy, expected_outputs[rank].entropy.detach(), msg=layout)
            for name, parameter in model.named_parameters():
                want = dict(reference.named_parameters())[name].grad
                got = parameter.grad.full_tensor()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{layout}, {name}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_head_gives_one_process_values_and_gradients():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
