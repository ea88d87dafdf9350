"""VRPO in a plain PyTorch loop: each prompt packed once with its K = 2 + 2M responses, the body
on the packed rows, the fused LM-head log-prob and loss on the response positions only.

    python examples/plain_loop.py --model Qwen/Qwen2.5-0.5B-Instruct    # a real model
    python examples/plain_loop.py --tiny                                # a tiny random one
"""
import argparse
import copy

import torch

from vrpo_fast import FusedLinearVRPOLoss, pack_groups
from vrpo_fast.data.tokenize import tokenize_prompt, tokenize_response
from vrpo_fast.logprobs import packed_hidden_states, packed_logps
from vrpo_fast.packing import row_padding

# prompt, chosen, rejected, 2M samples from pi_ref, g for (chosen, rejected) and each pair
ROWS = [("Q: 2+2?\nA:", " 4", " 5", [" four", " 22"], [0.9, 0.8]),
        ("Q: capital of France?\nA:", " Paris", " Rome", [" Lyon", " Paris!"], [0.95, 0.3]),
        ("Q: say hi\nA:", " Hi!", " No.", [" Hello", " Bye"], [0.8, 0.7])]

args = argparse.ArgumentParser()
args.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
args.add_argument("--tiny", action="store_true", help="a tiny random model, for a quick check")
args.add_argument("--steps", type=int, default=10)
args = args.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
if args.tiny:
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    model, tokenizer = build_tiny_causal_lm(), byte_tokenizer()
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
model.to(device)
ref = copy.deepcopy(model).eval().requires_grad_(False)           # pi_ref: the start point
prompt_ids = [tokenize_prompt(p, tokenizer) for p, *_ in ROWS]
response_ids = [[tokenize_response(p, r, tokenizer) for r in (c, rj, *s)]
                for p, c, rj, s, _ in ROWS]
aux_prefs = torch.tensor([g for *_, g in ROWS], device=device)    # (B, 1 + M)

loss_fn = FusedLinearVRPOLoss(beta=0.1, loss_type="sigmoid", estimator="vrpo")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if args.tiny else 5e-7)
# Rows in whole 128-token blocks on CUDA: FlexAttention has no backward for shorter rows.
batch = pack_groups(prompt_ids, response_ids, **row_padding(device)).to(device)
with torch.no_grad():
    ref_logps = packed_logps(ref, batch)                          # (B, K)
for step in range(1, args.steps + 1):
    hidden, weight = packed_hidden_states(model, batch)           # (N, D) response positions
    loss, stats = loss_fn(hidden, weight, batch.targets, batch.segment_ids,
                          batch.num_groups, batch.group_size, ref_logps, aux_prefs)
    loss.backward(); opt.step(); opt.zero_grad()  # noqa: E702
    print(f"step {step} loss {loss.item():.6f} accuracy {stats['accuracy'].item():.2f}")
