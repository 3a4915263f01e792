"""Shared pytest set-up: `gpu`-marked tests skip cleanly on machines without CUDA."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_process_megatron():
    """A world-1 gloo process group with megatron's parallel state, torn down afterwards."""
    from r1mega.config.schema import ParallelConfig
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown

    init_process_group()
    init_model_parallel(ParallelConfig(), seed=1)
    yield
    shutdown()
