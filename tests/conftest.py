import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def forget_modules(tmp_path):
    """Drop the modules a test imported from its tmp_path, so the next test imports its own
    (only those: dropping torch's or timm's lazily imported modules would break them)."""
    yield
    root = str(tmp_path)
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(root):
            del sys.modules[name]
