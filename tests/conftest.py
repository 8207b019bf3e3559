"""Shared pytest setup: tests marked ``gpu`` skip, with the reason, where CuPy sees no device."""

import pytest

from charnn import backend
def pytest_collection_modifyitems(config, items):
    if backend.gpu_count() > 0:
        return
    reason = "needs CuPy and a CUDA device" + ("" if backend.available else " (CuPy is not installed)")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
