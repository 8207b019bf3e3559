"""Shared pytest setup: tests marked ``gpu`` skip, with the reason, where CuPy sees no device;
the engine's planner and the model policy are off."""

import os

import pytest

# The planner (charnn/engine/plan.py) times the engine's paths the first time it meets a shape:
# off for the suite and the commands its tests start (their paths are fixed, and measuring
# would cost CI time); tests of the planner turn it on with settings of their own.
os.environ["CHARNN_PLAN"] = "0"
# The model policy (charnn/training/policy.py) chooses the size of a run given no size options:
# off for the suite, whose runs keep the sizes their tests were written for (and its default
# folders their old names); tests/test_policy.py turns it on.
os.environ["CHARNN_POLICY"] = "0"

from charnn import backend
def pytest_collection_modifyitems(config, items):
    if backend.gpu_count() > 0:
        return
    reason = "needs CuPy and a CUDA device" + ("" if backend.available else " (CuPy is not installed)")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
