"""Test-wide settings: everything offline, caches in a temporary HF_HOME."""
from __future__ import annotations

import os
import tempfile

# Set before any test module imports transformers / datasets / huggingface_hub: an accidental hub call then fails
# fast instead of spending ~23 s on retries.
_HF_HOME = tempfile.mkdtemp(prefix="rvl-test-hf-")
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HOME": _HF_HOME, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"})
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (restored after): on a shared 2-core machine spinning OpenMP threads
    cost far more than they bring."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
