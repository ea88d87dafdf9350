"""`vrpo-fast train --config configs/X.yaml [--section.key=value ...]`.

Re-running the same command resumes from the latest complete checkpoint. Under torchrun:
    torchrun --nproc-per-node 8 -m vrpo_fast.cli train --config configs/llama8b.yaml
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    from vrpo_fast.config import add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    from vrpo_fast.config import config_from_args
    from vrpo_fast.train.loop import train

    cfg = config_from_args(args)
    final = train(cfg)
    print(f"final model: {final}")
    return 0
