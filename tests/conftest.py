import pytest
import torch


@pytest.fixture(scope='module')
def one_torch_thread():
    "Toy models (hidden 32) only lose from intra-op threads on a shared 2-core runner (spin-waits): use one."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    "The `cuda` marker: tests that need a CUDA GPU (they skip without one); `pytest -m cuda` runs them (scripts/gpu_check.sh)."
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`')
