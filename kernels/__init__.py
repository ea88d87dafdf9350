"""Fused Triton kernels for vrpo_fast, installed as `vrpo_fast.kernels`.

Kernels depend only on torch and triton; the trainer imports them, never the reverse.
"""
