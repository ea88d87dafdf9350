"""VRPO with the Hugging Face Trainer: a collator that packs and a `compute_loss` override.

`add_packed_forward` lets `model(vrpo_batch=...)` return the (B, K) sequence log-probs from
inside the model's forward, so the wrappers the Trainer puts around the model through accelerate
(DDP, FSDP2, DeepSpeed) cover the LM head too. The rest (optimizer, schedule, logging,
checkpoints) is the Trainer's.

    python examples/hf_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct
    python examples/hf_trainer.py --tiny
"""
import argparse
import copy

import torch
from transformers import Trainer, TrainingArguments

from vrpo_fast import FusedLinearVRPOLoss, pack_groups
from vrpo_fast.data.tokenize import tokenize_prompt, tokenize_response
from vrpo_fast.integrations.packed import add_packed_forward
from vrpo_fast.packing import row_padding

# prompt, chosen, rejected, 2M samples from pi_ref, g for (chosen, rejected) and each pair
ROWS = [("Q: 2+2?\nA:", " 4", " 5", [" four", " 22"], [0.9, 0.8]),
        ("Q: capital of France?\nA:", " Paris", " Rome", [" Lyon", " Paris!"], [0.95, 0.3]),
        ("Q: say hi\nA:", " Hi!", " No.", [" Hello", " Bye"], [0.8, 0.7])]


class VRPOHFTrainer(Trainer):
    def __init__(self, *args, ref_model, loss_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model, self.loss_fn = ref_model.to(self.args.device), loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs["vrpo_batch"]
        with torch.no_grad():
            ref_logps = self.ref_model(vrpo_batch=batch)
        loss, stats = self.loss_fn.from_logps(model(vrpo_batch=batch), ref_logps,
                                              inputs["aux_prefs"])
        return (loss, stats) if return_outputs else loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output-dir", default="hf_trainer_out")
    args = parser.parse_args()
    if args.tiny:
        from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
        model, tokenizer = build_tiny_causal_lm(), byte_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    ref = add_packed_forward(copy.deepcopy(model).eval().requires_grad_(False))
    add_packed_forward(model)
    rows = [{"prompt_ids": tokenize_prompt(p, tokenizer),
             "response_ids": [tokenize_response(p, r, tokenizer) for r in (c, rj, *s)],
             "aux_prefs": g} for p, c, rj, s, g in ROWS]
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=len(rows),
        learning_rate=1e-3 if args.tiny else 5e-7, lr_scheduler_type="constant",
        logging_steps=1, remove_unused_columns=False, report_to=[], save_strategy="no")

    def collate(batch_rows):
        # Rows in whole 128-token blocks on CUDA: FlexAttention has no backward for shorter rows.
        packed = pack_groups([r["prompt_ids"] for r in batch_rows],
                             [r["response_ids"] for r in batch_rows],
                             **row_padding(training.device))
        return {"vrpo_batch": packed,
                "aux_prefs": torch.tensor([r["aux_prefs"] for r in batch_rows])}

    trainer = VRPOHFTrainer(model=model, args=training, train_dataset=rows,
                            data_collator=collate, ref_model=ref,
                            loss_fn=FusedLinearVRPOLoss(beta=0.1))
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']} loss {entry['loss']}")


if __name__ == "__main__":
    main()
