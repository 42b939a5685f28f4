import os
import pytest
import torch

# the engine picks CPU threads from the machine's load (qwen_edu.perf.configure_cpu_threads) unless OMP_NUM_THREADS is
# set: fix it for the tests (and the processes they start), so that runs compared bit for bit use the same count
os.environ.setdefault('OMP_NUM_THREADS', str(torch.get_num_threads()))


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
