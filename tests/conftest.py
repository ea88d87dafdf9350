"""Shared test set-up: Triton runs in its interpreter when no GPU is present (how CI tests the
kernels; on a GPU without the autotuner's search), and every test starts from a fixed seed."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One tile configuration per kernel: tests check values, not the autotuner's choice.
    os.environ.setdefault("VRPO_FAST_AUTOTUNE", "0")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    from vrpo_fast.models import byte_tokenizer

    return byte_tokenizer()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
