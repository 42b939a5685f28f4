"""Training: DDP == gradient accumulation, exact resume, crash-safe checkpoints, clear errors (qwen_edu.train)."""
import json, math, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

from qwen_edu.data import write_shards, ByteTokenizer
from qwen_edu.train import (TrainConfig, train, lr_at, param_groups, evaluate, unigram_baseline, token_byte_lengths,
                            read_metrics, latest_checkpoint, verify_checkpoint, list_checkpoints, train_parser)
import qwen_edu.train as T

VOCAB = 64
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _markov(n, rng):
    "A sequence with structure to learn: mostly t -> (7t + 3) mod V, sometimes random."
    t = np.zeros(n, dtype=np.int64); noise = rng.random(n) < 0.2; r = rng.integers(0, VOCAB, n)
    for i in range(1, n): t[i] = r[i] if noise[i] else (t[i - 1] * 7 + 3) % VOCAB
    return t


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp('shards'); rng = np.random.default_rng(0)
    write_shards(d, {'train': _markov(20000, rng), 'val': _markov(4000, rng)}, vocab_size=VOCAB, eos_id=0)
    return d


def cfg_for(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), max_steps=6, warmup_steps=1, batch_size=4, seq_len=16, lr=3e-3,
                log_every=1, eval_every=3, eval_batches=2, ckpt_every=2, progress=False, seed=0, **TINY)
    base.update(kw)
    return TrainConfig(**base)


def losses(out): return [(m['step'], m['loss'], m.get('val_loss')) for m in read_metrics(Path(out) / 'metrics.jsonl')]


def cli_flags(cfg):
    "TrainConfig -> command-line flags (exercises the generated CLI)."
    flags = []
    for k, v in vars(cfg).items():
        if v is None: continue
        flag = '--' + k.replace('_', '-')
        if isinstance(v, bool): flags.append(flag if v else '--no-' + k.replace('_', '-'))
        else: flags += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return flags


def test_two_processes_equal_one_with_grad_accum(shards, tmp_path):
    "torchrun --nproc_per_node=2 (gloo, DDP) gives the losses of 1 process with grad_accum=2 within 1e-5."
    ref = train(cfg_for(shards, tmp_path / 'one', grad_accum=2))
    ddp = cfg_for(shards, tmp_path / 'two', grad_accum=1)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        '-m', 'qwen_edu.train', *cli_flags(ddp)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert [s for s, *_ in a] == [s for s, *_ in b] == list(range(1, 7))
    for (s, la, va), (_, lb, vb) in zip(a, b):
        assert abs(la - lb) < 1e-5, (s, la, lb)
        if va is not None: assert abs(va - vb) < 1e-5
    assert 'val loss' in r.stdout and ref.val_loss is not None


def test_stop_and_resume_is_bit_exact(shards, tmp_path):
    "--stop-at-step K then --resume reproduces the uninterrupted run exactly (losses and weights)."
    full = train(cfg_for(shards, tmp_path / 'full'))
    part = train(cfg_for(shards, tmp_path / 'cut', stop_at_step=3))
    assert part.step == 3 and latest_checkpoint(tmp_path / 'cut' / 'ckpt').name == 'step_000003'
    res = train(cfg_for(shards, tmp_path / 'cut', resume=True))
    assert losses(tmp_path / 'full') == losses(tmp_path / 'cut')
    for (k, v), (k2, v2) in zip(full.model.state_dict().items(), res.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    loaded = T.load_trained_model(tmp_path / 'full')  # rebuilt from the checkpoint's config + weights
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad(): assert torch.equal(loaded(x).logits, full.model.eval()(x).logits)


def test_crash_during_checkpoint_keeps_latest(shards, tmp_path, monkeypatch):
    "A failure inside the 2nd checkpoint write leaves `latest` on the 1st, which resumes to the same losses."
    calls = {'n': 0}; real_save = torch.save
    def flaky_save(*a, **k):
        calls['n'] += 1
        if calls['n'] == 2: raise OSError('simulated crash mid-write')
        return real_save(*a, **k)
    monkeypatch.setattr(T.torch, 'save', flaky_save)
    with pytest.raises(OSError, match='simulated crash'): train(cfg_for(shards, tmp_path / 'run'))
    monkeypatch.setattr(T.torch, 'save', real_save)
    ckpt = tmp_path / 'run' / 'ckpt'
    assert latest_checkpoint(ckpt).name == 'step_000002' and verify_checkpoint(latest_checkpoint(ckpt))['step'] == 2
    assert (ckpt / 'ckpt_tmp').exists()  # the debris of the crash, ignored and cleaned by the next save
    train(cfg_for(shards, tmp_path / 'run', resume=True))
    train(cfg_for(shards, tmp_path / 'ref'))
    assert losses(tmp_path / 'run') == losses(tmp_path / 'ref')
    assert not (ckpt / 'ckpt_tmp').exists()


def test_corrupt_checkpoint_is_a_clear_error_and_loses_nothing(shards, tmp_path):
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=4))
    ckpt = tmp_path / 'run' / 'ckpt'
    f = latest_checkpoint(ckpt) / 'model.safetensors'
    b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0xFF; f.write_bytes(bytes(b))
    before = (tmp_path / 'run' / 'metrics.jsonl').read_text()
    with pytest.raises(ValueError, match=r'step_000004 is corrupt .*--resume-from .*step_000002'):
        train(cfg_for(shards, tmp_path / 'run', resume=True))
    assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == before
    r = train(cfg_for(shards, tmp_path / 'run', resume_from=str(ckpt / 'step_000002')))  # the advice works
    assert r.step == 6


def test_bad_input_is_a_clear_error_before_writing(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match='--data builtin'):
        train(cfg_for(tmp_path / 'nope', tmp_path / 'a'))
    assert not (tmp_path / 'a').exists()
    with pytest.raises(ValueError, match='schedule must be'): train(cfg_for(shards, tmp_path / 'a', schedule='step'))
    with pytest.raises(FileNotFoundError, match='no checkpoint'): train(cfg_for(shards, tmp_path / 'a', resume=True))
    assert not (tmp_path / 'a').exists()
    train(cfg_for(shards, tmp_path / 'b', max_steps=2))
    before = (tmp_path / 'b' / 'metrics.jsonl').read_text()
    with pytest.raises(FileExistsError, match='--resume'): train(cfg_for(shards, tmp_path / 'b', max_steps=2))
    assert (tmp_path / 'b' / 'metrics.jsonl').read_text() == before
    with pytest.raises(ValueError, match='same global batch'):
        train(cfg_for(shards, tmp_path / 'b', max_steps=4, resume=True, batch_size=8))


def test_learns_below_unigram_and_writes_outputs(shards, tmp_path):
    r = train(cfg_for(shards, tmp_path / 'run', max_steps=40, warmup_steps=4, eval_every=20, log_every=10,
                      ckpt_every=20, batch_size=8, lr=1e-2))
    assert r.val_loss < r.unigram_loss - 0.5, (r.val_loss, r.unigram_loss)
    assert r.unigram_loss == pytest.approx(unigram_baseline(np.fromfile(shards / 'train.bin', np.uint16),
                                                            np.fromfile(shards / 'val.bin', np.uint16), VOCAB), abs=0.05)
    m = read_metrics(tmp_path / 'run' / 'metrics.jsonl')
    assert all({'step', 'loss', 'lr', 'tokens_per_s'} <= set(x) for x in m) and m[-1]['step'] == 40
    assert (tmp_path / 'run' / 'loss.png').stat().st_size > 1000
    assert [p.name for p in list_checkpoints(tmp_path / 'run' / 'ckpt')] == ['step_000020', 'step_000040']


def test_wsd_schedule_and_param_groups():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(99, 100, 1.0, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert [lr_at(s, 100, 1.0, 10, 0.1, 'wsd') for s in (50, 79)] == [1.0, 1.0]
    assert lr_at(99, 100, 1.0, 10, 0.1, 'wsd') == pytest.approx(0.1)
    from qwen_edu.config import QwenConfig
    from qwen_edu.model import QwenForCausalLM
    m = QwenForCausalLM(QwenConfig.from_preset('edu-tiny', vocab_size=VOCAB, **TINY))
    dec, nodec = param_groups(m, 0.1)
    assert all(p.dim() == 2 for p in dec['params']) and all(p.dim() == 1 for p in nodec['params'])
    assert sum(p.numel() for g in (dec, nodec) for p in g['params']) == sum(p.numel() for p in m.parameters())


def test_bits_per_byte_with_byte_tokens():
    "With one byte per token bpb = loss / ln 2; control tokens count no bytes."
    tb = token_byte_lengths(ByteTokenizer(), 257)
    assert tb[:256].eq(1).all() and tb[256] == 0
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return type('O', (), {'logits': torch.zeros(*x.shape, 257), 'aux_loss': None})()
    x = torch.randint(0, 256, (2, 8))
    r = evaluate(Uniform(), [(x, x)], torch.device('cpu'), tb)
    assert r['val_loss'] == pytest.approx(math.log(257)) and r['val_bpb'] == pytest.approx(math.log(257) / math.log(2))


def test_cli_flags_cover_the_config():
    a = train_parser().parse_args(['--max-steps', '7', '--stop-at-step', '3', '--resume', '--rope-theta', '10000'])
    assert (a.max_steps, a.stop_at_step, a.resume, a.rope_theta) == (7, 3, True, 10000.0)
    assert set(vars(a)) == set(vars(TrainConfig()))


def test_gpu_mfu_bench_runs_in_smoke_mode(tmp_path):
    "bench/gpu/bench_mfu.py --smoke runs the GPU benchmark's code path on the CPU and reports tokens/s and MFU."
    script = Path(__file__).parents[1] / 'bench' / 'gpu' / 'bench_mfu.py'
    r = subprocess.run([sys.executable, str(script), '--smoke', '--peak-flops', '1e11', '--json', str(tmp_path / 'r.json')],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / 'r.json').read_text())
    assert res['tokens_per_s'] > 0 and res['smoke'] and math.isfinite(res['final_loss'])
    assert res['mfu'] == pytest.approx(res['tokens_per_s'] * res['flops_per_token'] / 1e11, rel=1e-3)  # tokens_per_s is rounded
