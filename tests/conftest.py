import pytest

from dist_pool import DistPool

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
