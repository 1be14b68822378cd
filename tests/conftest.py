import os

import pytest

from dist_pool import DistPool

# The NaN/Inf guard is off by default for speed; every test (and every process a test starts,
# which inherits this environment) runs with it on, so a non-finite block anywhere fails loudly.
os.environ.setdefault("HF_STRIPED_CHECK_FINITE", "1")

_pools: dict[int, DistPool] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """``dist_pool(P)`` -> a live gloo pool of P processes, shared by the whole session."""

    def get(world_size: int) -> DistPool:
        pool = _pools.get(world_size)
        if pool is None or not pool.healthy:
            pool = _pools[world_size] = DistPool(world_size)
        return pool

    yield get
    for pool in _pools.values():
        pool.close()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    from hf_striped.tools.pretrained import smollm2_folder

    return smollm2_folder()
