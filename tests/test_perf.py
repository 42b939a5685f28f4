"qwen_edu.perf: peak FLOPs by exact GPU name, MFU, synchronised timing, CPU threads under contention."
import os, time, warnings
import pytest
import torch
from qwen_edu import perf
from qwen_edu.perf import (PEAK_BF16_FLOPS, SyncTimer, available_cpus, cgroup_cpu_limit, check_peak_flops,
                           choose_cpu_threads, configure_cpu_threads, mfu, other_load, peak_flops, peak_flops_for,
                           synced_clock, synchronize)




def test_peak_table_dense_bf16_by_exact_name():
    want = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
            'NVIDIA H200': 989e12, 'NVIDIA A100-SXM4-40GB': 312e12, 'NVIDIA A100-SXM4-80GB': 312e12,
            'NVIDIA A100-PCIE-40GB': 312e12, 'NVIDIA A100 80GB PCIe': 312e12, 'NVIDIA L40S': 362e12,
            'NVIDIA GeForce RTX 4090': 165e12}
    for name, v in want.items(): assert peak_flops_for(name) == v, name
    # never a substring guess: names that contain a known one, or are contained in one, are unknown
    for name in ('NVIDIA H100', 'H100', 'NVIDIA H100 PCIe-2', 'NVIDIA H200 SXM 141GB', 'NVIDIA A100', 'NVIDIA GeForce RTX 4090 D'):
        assert peak_flops_for(name) is None, name


def test_peak_flops_cuda_device_by_name(monkeypatch):
    names = iter(['NVIDIA H100 PCIe', 'NVIDIA H100 80GB HBM3', 'NVIDIA B200'])
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: next(names))
    assert peak_flops('cuda') == 756e12          # the PCIe card, not the SXM's 989e12 (the old substring rule)
    assert peak_flops('cuda:0') == 989e12
    with pytest.warns(UserWarning, match='--peak-flops'): assert peak_flops('cuda') is None
    assert peak_flops('cuda', override=2.25e15) == 2.25e15
    assert peak_flops('cpu') is None and peak_flops(torch.device('cpu'), override=1e12) == 1e12


@pytest.mark.parametrize('bad,msg', [(989, 'not TFLOP/s'), (0, '> 0'), (-1e12, '> 0'), (float('inf'), 'finite'),
                                     (float('nan'), 'finite'), ('989e12', 'finite'), (True, 'finite')])
def test_peak_flops_override_checked(bad, msg):
    with pytest.raises(ValueError, match=msg): check_peak_flops(bad)
    with pytest.raises(ValueError, match=msg): peak_flops('cpu', override=bad)


def test_mfu():
    assert mfu(400_000, 1e9, 989e12) == pytest.approx(400_000 * 1e9 / 989e12)
    assert mfu(800_000, 1e9, 989e12, world=2) == pytest.approx(mfu(400_000, 1e9, 989e12))
    assert mfu(1, 1, None) is None and mfu(None, 1, 1e12) is None
    for w in (0, 1.5, True):
        with pytest.raises(ValueError, match='world'): mfu(1, 1, 1e12, world=w)


def test_mfu_against_flops_per_token():
    from qwen_edu.config import QwenConfig
    cfg = QwenConfig.from_preset('edu-base')
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 2048
    assert cfg.flops_per_token(2048) == pytest.approx(6 * cfg.num_params() + attn)


def test_sync_before_clock(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda d=None: calls.append(('sync', d)))
    real = time.perf_counter
    monkeypatch.setattr(perf.time, 'perf_counter', lambda: calls.append('clock') or real())
    synced_clock('cuda:0')
    assert calls == [('sync', torch.device('cuda:0')), 'clock']   # the device first, then the clock
    calls.clear()
    with SyncTimer('cuda') as t: pass
    assert [c if c == 'clock' else 'sync' for c in calls] == ['sync', 'clock', 'sync', 'clock'] and t.seconds >= 0
    calls.clear(); synchronize('cpu'); assert calls == []


def test_sync_timer_cpu():
    x = torch.randn(128, 128)
    with SyncTimer('cpu') as t:
        for _ in range(5): x = torch.tanh(x @ x)
    assert t.seconds > 0


def test_choose_cpu_threads():
    assert choose_cpu_threads(2, 0.0) == 2 and choose_cpu_threads(2, 0.3) == 2
    assert choose_cpu_threads(2, 0.7) == 1 and choose_cpu_threads(2, 3.0) == 1   # three other jobs on 2 cores
    assert choose_cpu_threads(16, 4.2) == 12 and choose_cpu_threads(16, 40) == 1 and choose_cpu_threads(1, 0) == 1


def test_cgroup_cpu_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / 'cpu.max').write_text('max 100000\n'); assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / 'cpu.max').write_text('250000 100000\n'); assert cgroup_cpu_limit(tmp_path) == 2.5
    v1 = tmp_path / 'v1'; (v1 / 'cpu').mkdir(parents=True)
    (v1 / 'cpu' / 'cpu.cfs_quota_us').write_text('-1\n'); (v1 / 'cpu' / 'cpu.cfs_period_us').write_text('100000\n')
    assert cgroup_cpu_limit(v1) is None
    (v1 / 'cpu' / 'cpu.cfs_quota_us').write_text('50000\n'); assert cgroup_cpu_limit(v1) == 0.5
    assert available_cpus(v1) == 1
    (tmp_path / 'cpu.max').write_text('100000 100000\n'); assert available_cpus(tmp_path) == 1


def test_other_load(monkeypatch):
    monkeypatch.setattr(os, 'getloadavg', lambda: (3.4, 1.0, 0.5))
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    assert other_load(own=1.0, cpus=2) == pytest.approx(2.4)
    assert other_load(own=4.0, cpus=2) == 0.0
    monkeypatch.setattr(os, 'cpu_count', lambda: 64)   # a container's view of a 64-CPU host's load
    assert other_load(own=1.0, cpus=2) == pytest.approx(2.4 * 2 / 64)


def test_configure_cpu_threads(monkeypatch):
    n0 = torch.get_num_threads()
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        for bad in (0, -1, 1.5, True, '2'):
            with pytest.raises(ValueError, match='>= 1'): configure_cpu_threads(bad)
        monkeypatch.setattr(perf, 'available_cpus', lambda root='/sys/fs/cgroup': 2)
        monkeypatch.setattr(os, 'cpu_count', lambda: 2)
        monkeypatch.setattr(os, 'getloadavg', lambda: (4.2, 4.0, 3.0))  # three hogs + us
        assert configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(os, 'getloadavg', lambda: (1.1, 1.0, 1.0))  # just us
        assert configure_cpu_threads() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(os, 'getloadavg', lambda: (2.1, 2.0, 2.0))  # us with 2 threads, between log steps
        assert configure_cpu_threads(own=2) == 2
        monkeypatch.setenv('OMP_NUM_THREADS', '1')                      # the user's choice wins
        torch.set_num_threads(2)
        assert configure_cpu_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n0)


def test_perf_imports_only_torch_and_stdlib():
    import ast, sys
    tree = ast.parse(open(perf.__file__).read())
    mods = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split('.')[0]
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert mods <= {'torch'} | set(sys.stdlib_module_names), mods


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_peak_flops_real_gpu():
    name = torch.cuda.get_device_name(0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        p = peak_flops('cuda')
    assert p == PEAK_BF16_FLOPS.get(name)
    assert (p is None) == any('--peak-flops' in str(x.message) for x in w)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_sync_timer_measures_gpu_work():
    dev = torch.device('cuda')
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3): a @ a
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(30): a @ a
    unsynced = time.perf_counter() - t0
    with SyncTimer(dev) as t:
        for _ in range(30): a @ a
    assert t.seconds > unsynced
    peak = peak_flops(dev, warn=False)
    if peak: assert 30 * 2 * 8192**3 / t.seconds < 1.05 * peak   # nothing runs faster than the datasheet's peak
