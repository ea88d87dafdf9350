"""Shared test set-up: Triton runs in its interpreter when no GPU is present (how CI tests the
kernels; on a GPU without the autotuner's search), and every test starts from a fixed seed."""

import os

# OpenMP threads that wait for work sleep instead of spinning. Set before torch loads its
# OpenMP runtime, so every subprocess a test starts (the CLI, torchrun's ranks) inherits it.
# Tests run tiny operations back to back, often in several processes at once (2 ranks x 2
# threads on 2 cores): spinning threads then hold the cores the working ones need, and a tiny
# training step took seconds instead of a tenth of one. Numerics are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One tile configuration per kernel: tests check values, not the autotuner's choice.
    os.environ.setdefault("VRPO_FAST_AUTOTUNE", "0")

import pytest  # noqa: E402

# Two threads per process, or the cores shared out among pytest-xdist's workers (-n N).
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    from vrpo_fast.models import byte_tokenizer

    return byte_tokenizer()


# Tests marked `vllm` run real vLLM. Where vllm is not installed (the main environment) they
# are deselected, not skipped, and one line says how many and how to run them; in the vLLM
# environment (`bash scripts/install_vllm.sh`) they run, and `.ci/vllm` fails if one skips.
VLLM_RUN = "bash scripts/install_vllm.sh && .venv-vllm/bin/python -P -m pytest -m vllm"
_vllm_deselected = 0


def _deselect_vllm(config, items) -> None:
    global _vllm_deselected
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    drop = [item for item in items if item.get_closest_marker("vllm")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]
    _vllm_deselected = len(drop)
    if hasattr(config, "workeroutput"):      # a pytest-xdist worker: tell the controller
        config.workeroutput["vllm_deselected"] = len(drop)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    global _vllm_deselected
    _vllm_deselected = max(_vllm_deselected, node.workeroutput.get("vllm_deselected", 0))


def pytest_terminal_summary(terminalreporter):
    if _vllm_deselected:
        terminalreporter.write_line(
            f"vllm: {_vllm_deselected} tests need vLLM, which is not installed here: "
            f"deselected; run them with `{VLLM_RUN}`")


def pytest_collection_modifyitems(config, items):
    _deselect_vllm(config, items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
