import pytest

from tests.distributed import run_distributed


@pytest.fixture
def distributed():
    """``distributed(fn, world_size, *args, tp_size=None)`` runs ``fn(ctx, *args)`` on gloo."""
    return run_distributed
