"""Benchmarks of the fused kernels and of one training step, shipped with the package.

`vrpo-fast bench` (command.py) measures at any shape from an installed wheel; the pytest
suites of a source checkout's benchmarks/ import the same pieces: providers, inputs and
correctness checks per op (linear_logprob.py, vrpo_loss.py, step.py), the references they are
checked against (references.py), timing (timing.py), peak memory (memory.py), the model and
length layouts (layouts.py, presets.py), row stamps (env.py) and tables / charts (report.py).
"""

from vrpo_fast.bench.command import add_arguments, run

__all__ = ["add_arguments", "run"]
