import os
import numpy as np
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


SHARD_VOCAB = 64  # the token shards of the training tests (test_train, test_distributed): vocab 64


def _markov(n, rng, V=SHARD_VOCAB):
    "A sequence with structure to learn: mostly t -> (7t + 3) mod V, sometimes random."
    t = np.zeros(n, dtype=np.int64); noise = rng.random(n) < 0.2; r = rng.integers(0, V, n)
    for i in range(1, n): t[i] = r[i] if noise[i] else (t[i - 1] * 7 + 3) % V
    return t


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    "train/val shards (20k / 4k tokens of a learnable Markov chain) for the training tests."
    from qwen_edu.data import write_shards
    d = tmp_path_factory.mktemp('shards'); rng = np.random.default_rng(0)
    write_shards(d, {'train': _markov(20000, rng), 'val': _markov(4000, rng)}, vocab_size=SHARD_VOCAB, eos_id=0)
    return d
