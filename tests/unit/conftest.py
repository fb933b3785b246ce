import pytest


@pytest.fixture
def one_thread():
    """Torch on one thread: on 2 shared cores, two threads make each tiny op slower, not faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
