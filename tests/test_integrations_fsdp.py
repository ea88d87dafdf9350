"""The fused loss under FSDP2, two gloo processes under torchrun.

Two ways a user's loop meets a sharded LM head, each against the same model unsharded in every
process, with the loss averaged over the two ranks' batches (FSDP2's gradient is the rank
average):
- the head outside any forward: the body is its own FSDP root and the head a separate FSDP unit
  that never runs, so `lm_head.weight` is a sharded DTensor when `FusedLinearVRPOLoss` gets it;
  the loss gathers it and reduce-scatters its gradient;
- the head inside the root's forward: `add_packed_forward` with the whole model as the root, the
  loss from `FusedLinearVRPOLoss.from_logps`.
Every parameter's gradient must equal the reference's.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import copy, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from vrpo_fast.integrations.packed import add_packed_forward
from vrpo_fast.logprobs import packed_hidden_states
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.ops import FusedLinearVRPOLoss
from vrpo_fast.packing import pack_groups

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
G, K = 2, 4


def rank_data(r):
    gen = torch.Generator().manual_seed(100 + r)
    ids = lambda n: torch.randint(3, 259, (n,), generator=gen).tolist()
    length = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))
    prompts = [ids(length(2, 8)) for _ in range(G)]
    responses = [[ids(length(1, 6)) for _ in range(K)] for _ in range(G)]
    ref = torch.randn(G, K, generator=gen) - 20
    aux = torch.rand(G, K // 2, generator=gen)
    return pack_groups(prompts, responses), ref, aux


loss_fn = FusedLinearVRPOLoss(beta=0.3, estimator="vrpo")
base = build_tiny_causal_lm(seed=3, vocab_size=259)

# The reference: the unsharded model, the loss averaged over both ranks' batches.
reference = copy.deepcopy(base)
total = 0
for r in range(world):
    batch, ref, aux = rank_data(r)
    hidden, weight = packed_hidden_states(reference, batch)
    loss, _ = loss_fn(hidden, weight, batch.targets, batch.segment_ids, G, K, ref, aux)
    total = total + loss / world
total.backward()
want = {n: p.grad for n, p in reference.named_parameters()}
batch, ref, aux = rank_data(rank)


def check(model, what):
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if not torch.allclose(g, want[n], rtol=1e-4, atol=1e-6):
            sys.exit(f"{what}: gradient of {n} differs by {(g - want[n]).abs().max():.3g}")


# 1. The head outside any forward: a sharded DTensor reaches the loss.
model = copy.deepcopy(base)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model.model)
fully_shard(model.lm_head)
assert isinstance(model.lm_head.weight, DTensor)
hidden, weight = packed_hidden_states(model, batch)
assert isinstance(weight, DTensor)
loss, _ = loss_fn(hidden, weight, batch.targets, batch.segment_ids, G, K, ref, aux)
loss.backward()
check(model, "head outside the forward")

# 2. The head inside the root's forward.
model = add_packed_forward(copy.deepcopy(base))
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
loss, _ = loss_fn.from_logps(model(vrpo_batch=batch), ref, aux)
loss.backward()
check(model, "head inside the root's forward")
dist.destroy_process_group()
print(f"rank {rank} ok", flush=True)
# Skip the interpreter's teardown: a worker thread torch leaves behind has aborted the process
# at exit ("terminate called without an active exception") after both ranks were done.
os._exit(0)
'''


@pytest.mark.slow
def test_fused_loss_gathers_a_sharded_head_and_matches_the_unsharded_gradients(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--standalone", str(script)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout


def test_a_zero3_placeholder_head_is_refused_with_what_to_do():
    from vrpo_fast.ops import linear_logprobs

    weight = torch.empty(0)
    weight.ds_id = 7                      # what DeepSpeed ZeRO-3 leaves outside its forward
    with pytest.raises(ValueError, match="ZeRO-3.*GatheredParameters"):
        linear_logprobs(torch.randn(3, 4), weight, torch.zeros(3, dtype=torch.long))
