"""The fused loss inside other trainers.

- `padded`: padded (B, T, D) hidden states and labels -> the fused loss's inputs, for trainers
  that keep their padded batches;
- `liger`: `LigerFusedLinearDPOLoss` with Liger-Kernel's call shape (one import to change);
- `trl`: `VRPOConfig` / `VRPOTrainer`, TRL's DPOTrainer with shared-prefix packing and the VRPO
  estimator (needs `pip install vrpo-fast[trl]`);
- `packed`: the packed log-prob pass as a model forward, so that wrappers which act in forward
  (DDP, FSDP2, DeepSpeed) see the LM head used inside it.
See docs/integrations.md.
"""
