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
import qwen_edu.checkpoint as CK
import qwen_edu.engine as E

VOCAB = 64
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


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
    calls = {'n': 0}; real_save = CK.save_state
    def flaky_save(*a, **k):
        calls['n'] += 1
        if calls['n'] == 2: raise OSError('simulated crash mid-write')
        return real_save(*a, **k)
    monkeypatch.setattr(CK, 'save_state', flaky_save)
    with pytest.raises(OSError, match='simulated crash'): train(cfg_for(shards, tmp_path / 'run'))
    monkeypatch.setattr(CK, 'save_state', real_save)
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
    class Uniform(torch.nn.Module):  # evaluate asks for per-token losses: log 257 each (uniform over the vocabulary)
        def forward(self, x, labels, return_logits, shift_labels, loss_reduction):
            assert (return_logits, shift_labels, loss_reduction) == (False, False, 'none')
            return type('O', (), {'loss': torch.full(x.shape, math.log(257))})()
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


# ---- hardening (issue #11): checkpoints without pickle, resume guards, clear errors ----

class _Payload:
    "A pickle that would create `marker` when unpickled."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


def _forge_complete(ckpt_dir):
    "What an attacker does: recompute the checksums so the manifest matches the crafted files."
    import hashlib
    files = [f for f in ('model.safetensors', 'state.pt', 'state.json', 'state.safetensors') if (ckpt_dir / f).exists()]
    sums = {f: hashlib.sha256((ckpt_dir / f).read_bytes()).hexdigest() for f in files}
    (ckpt_dir / 'complete.json').write_text(json.dumps(dict(step=2, sha256=sums)))


def test_crafted_pickle_checkpoint_is_never_executed(shards, tmp_path):
    "A state.pt with a __reduce__ payload (and re-forged checksums) is refused as an old/unsafe format, never unpickled."
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=2))
    ck = latest_checkpoint(tmp_path / 'run' / 'ckpt')
    assert sorted(p.name for p in ck.iterdir()) == ['complete.json', 'model.safetensors', 'state.json', 'state.safetensors']
    marker = tmp_path / 'pwned'
    for f in ('state.json', 'state.safetensors'): (ck / f).unlink(missing_ok=True)
    torch.save({'step': 2, 'x': _Payload(marker)}, ck / 'state.pt')
    _forge_complete(ck)
    with pytest.raises(ValueError, match=r'old .*format.*state\.pt'): train(cfg_for(shards, tmp_path / 'run', resume=True))
    with pytest.raises(ValueError, match='unsafe'): T.load_trained_model(tmp_path / 'run')
    assert not marker.exists()


def test_latest_names_a_sibling_checkpoint_only(shards, tmp_path):
    "`latest` holding an absolute path, '..' or a separator is refused; an empty one falls back to the newest checkpoint."
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=4))
    ckpt = tmp_path / 'run' / 'ckpt'
    for bad in (str(tmp_path / 'elsewhere'), '../run/ckpt/step_000002', 'step_000002/../step_000004', 'x/y'):
        (ckpt / 'latest').write_text(bad + '\n')
        with pytest.raises(ValueError, match='latest'): latest_checkpoint(ckpt)
    (ckpt / 'latest').write_text('')
    with pytest.warns(UserWarning, match='step_000004'): assert latest_checkpoint(ckpt).name == 'step_000004'
    with pytest.warns(UserWarning): r = train(cfg_for(shards, tmp_path / 'run', resume=True))
    assert r.step == 6


def test_state_round_trips_without_pickle(tmp_path):
    "Optimizer (int keys, tuples), RNG states (tuples, numpy arrays, byte tensors) and non-finite floats come back exactly."
    m = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 3)).sum().backward(); opt.step()
    st = dict(step=3, optimizer=opt.state_dict(), rng=T.rng_state(), x={'__odd': float('nan'), 1: (2, 'a')},
              y={'a.b': {'c': torch.ones(2)}, 'a': {'b.c': torch.zeros(2)}})  # the same dotted path twice
    T.save_state(tmp_path, st)
    back = T.load_state(tmp_path)
    assert back['rng']['python'] == st['rng']['python'] and torch.equal(back['rng']['torch'], st['rng']['torch'])
    assert all((a == b).all() if isinstance(a, np.ndarray) else a == b for a, b in zip(back['rng']['numpy'], st['rng']['numpy']))
    assert back['optimizer']['param_groups'] == st['optimizer']['param_groups']
    for k, s in st['optimizer']['state'].items():
        assert all(torch.equal(s[n], back['optimizer']['state'][k][n]) for n in s)
    assert back['x'][1] == (2, 'a') and math.isnan(back['x']['__odd'])
    assert torch.equal(back['y']['a.b']['c'], torch.ones(2)) and torch.equal(back['y']['a']['b.c'], torch.zeros(2))
    (tmp_path / 'state.json').write_text(json.dumps({'step': {'__tensor__': 'missing'}}))
    with pytest.raises(ValueError, match='unreadable training state'): T.load_state(tmp_path)


def test_finished_run_resumes_to_nothing_to_do(shards, tmp_path, capsys):
    "Resuming a finished run (or with --stop-at-step below the checkpoint) changes no file and reports its figures."
    full = train(cfg_for(shards, tmp_path / 'run'))
    run = tmp_path / 'run'
    before = {f: (run / f).read_bytes() for f in ('summary.json', 'metrics.jsonl', 'train_config.json')}
    capsys.readouterr()
    for kw in (dict(resume=True), dict(resume=True, stop_at_step=4)):
        r = train(cfg_for(shards, run, **kw))
        assert 'nothing to do' in capsys.readouterr().out
        assert {f: (run / f).read_bytes() for f in before} == before
        assert (r.step, r.val_loss, r.train_loss) == (6, full.val_loss, full.train_loss)
    assert 'NaN' not in before['summary.json'].decode()
    with pytest.raises(ValueError, match=r'max_steps: 6 -> 4'): train(cfg_for(shards, run, resume=True, max_steps=4))
    r = train(cfg_for(shards, run, resume=True, max_steps=4, allow_config_change='max_steps'))  # asked for: nothing to do
    assert r.step == 6 and {f: (run / f).read_bytes() for f in before} == before


def test_resume_refuses_config_changes_unless_allowed(shards, tmp_path):
    "A changed seed/lr/max_steps is listed (field: old -> new); --allow-config-change max_steps extends a run."
    run = tmp_path / 'run'
    train(cfg_for(shards, run, stop_at_step=2))
    before = (run / 'train_config.json').read_text()
    with pytest.raises(ValueError, match=r'seed: 0 -> 1'): train(cfg_for(shards, run, resume=True, seed=1))
    with pytest.raises(ValueError, match=r'max_steps: 6 -> 8.*lr: 0\.003 -> 0\.01.*--allow-config-change max_steps,lr'):
        train(cfg_for(shards, run, resume=True, lr=0.01, max_steps=8))
    assert (run / 'train_config.json').read_text() == before
    r = train(cfg_for(shards, run, resume=True, max_steps=8, allow_config_change='max_steps'))
    assert r.step == 8 and json.loads((run / 'train_config.json').read_text())['max_steps'] == 8
    with pytest.raises(ValueError, match='--allow-config-change'): T.check_train_config(TrainConfig(allow_config_change='out'))


def test_resume_with_another_model_is_a_clear_error(shards, tmp_path):
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=2))
    with pytest.raises(ValueError, match=r'hidden_size: 32 -> 64'):
        train(cfg_for(shards, tmp_path / 'run', resume=True, hidden_size=64))


def test_nonfinite_and_out_of_range_config_is_refused():
    for kw, field in [(dict(lr=float('inf')), 'lr'), (dict(weight_decay=float('nan')), 'weight_decay'),
                      (dict(rope_theta=float('nan')), 'rope_theta'), (dict(grad_clip=float('nan')), 'grad_clip'),
                      (dict(grad_clip=-1.0), 'grad_clip'), (dict(beta2=1.0), 'beta2'), (dict(seed=-1), 'seed'),
                      (dict(seed=2**70), 'seed'), (dict(peak_flops=float('inf')), 'peak_flops'),
                      (dict(min_lr_ratio=float('nan')), 'min_lr_ratio')]:
        with pytest.raises(ValueError, match=field): T.check_train_config(TrainConfig(**kw))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    "A NaN loss at step 4 stops the run with an error naming the step; step_000002 stays latest, nothing NaN is written."
    real, calls = T.next_token_loss, {'n': 0}
    def nan_from_step_4(model, x, y):
        loss = real(model, x, y)
        calls['n'] += 1
        if calls['n'] >= 4: loss = loss * float('nan')
        return loss
    monkeypatch.setattr(T, 'next_token_loss', nan_from_step_4)
    with pytest.raises(FloatingPointError, match=r'step 4\b.*step_000002'): train(cfg_for(shards, tmp_path / 'run'))
    ckpt = tmp_path / 'run' / 'ckpt'
    assert latest_checkpoint(ckpt).name == 'step_000002' and [p.name for p in list_checkpoints(ckpt)] == ['step_000002']
    text = (tmp_path / 'run' / 'metrics.jsonl').read_text()
    assert 'NaN' not in text and [m['step'] for m in read_metrics(tmp_path / 'run' / 'metrics.jsonl')] == [1, 2, 3]


def test_run_cut_before_its_first_checkpoint_restarts(shards, tmp_path, monkeypatch, capsys):
    "No checkpoint yet: --resume says to run without it, and running without it starts again (same losses as a clean run)."
    def killed(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(E, 'save_checkpoint', killed)
    with pytest.raises(KeyboardInterrupt): train(cfg_for(shards, tmp_path / 'run'))
    monkeypatch.undo()
    assert read_metrics(tmp_path / 'run' / 'metrics.jsonl')  # it had logged steps, but saved nothing
    with pytest.raises(FileNotFoundError, match='without --resume'): train(cfg_for(shards, tmp_path / 'run', resume=True))
    train(cfg_for(shards, tmp_path / 'run'))
    assert 'starting it again' in capsys.readouterr().out
    train(cfg_for(shards, tmp_path / 'ref'))
    assert losses(tmp_path / 'run') == losses(tmp_path / 'ref')


def test_torn_last_metrics_line_is_tolerated(shards, tmp_path):
    "A partial last line (disk full) is skipped when reading and dropped on resume; a bad middle line is a clear error."
    train(cfg_for(shards, tmp_path / 'cut', stop_at_step=4))
    mp = tmp_path / 'cut' / 'metrics.jsonl'
    with open(mp, 'a') as f: f.write('{"step": 5, "lo')
    assert [m['step'] for m in read_metrics(mp)] == [1, 2, 3, 4]
    train(cfg_for(shards, tmp_path / 'cut', resume=True))
    train(cfg_for(shards, tmp_path / 'full'))
    assert losses(tmp_path / 'cut') == losses(tmp_path / 'full')
    bad = tmp_path / 'bad.jsonl'; bad.write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match='line 2'): read_metrics(bad)


def test_malformed_complete_json_is_a_clear_error(shards, tmp_path):
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=4))
    ck = latest_checkpoint(tmp_path / 'run' / 'ckpt')
    f = ck / 'model.safetensors'; b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0xFF; f.write_bytes(bytes(b))
    for doc in ({'step': 4}, {'step': 4, 'sha256': {}}, {'step': 4, 'sha256': {'../../x': '0'}}, []):
        (ck / 'complete.json').write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=r'complete\.json.*--resume-from .*step_000002'): verify_checkpoint(ck)


def test_short_runs_fit_the_default_warmup_and_rotation_sorts_by_step(tmp_path):
    "--max-steps 8 works with the default warmup (min(30, max_steps // 10)); rotation keeps the highest step numbers."
    T.check_train_config(TrainConfig(max_steps=8))
    assert T.warmup_for(TrainConfig(max_steps=8)) == 0 and T.warmup_for(TrainConfig(max_steps=1000)) == 30
    sd = {'w': torch.zeros(2)}
    for s in (999_999, 1_000_000, 1_000_001): T.save_checkpoint(tmp_path, s, sd, {'step': s}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step_1000000', 'step_1000001']
    assert latest_checkpoint(tmp_path).name == 'step_1000001'


def test_load_shards_reads_meta_through_data(shards, monkeypatch):
    "load_shards validates meta.json through qwen_edu.data.read_meta (one reader for the shard format)."
    import qwen_edu.data as D
    real = D.read_meta
    monkeypatch.setattr(D, 'read_meta', lambda d: {**real(d), 'checked_by': 'read_meta'})
    meta = T.load_shards(shards)[2]
    assert meta['vocab_size'] == VOCAB and meta['checked_by'] == 'read_meta'


def test_fsdp_stop_and_resume_is_exact(shards, tmp_path):
    "Under FSDP2 (2 processes, gloo) the optimizer state goes through the pickle-free format and resumes exactly."
    env = dict(os.environ, OMP_NUM_THREADS='1')
    def run(out, **kw):
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                            '-m', 'qwen_edu.train', *cli_flags(cfg_for(shards, out, max_steps=4, fsdp=True, **kw))],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    run(tmp_path / 'full')  # checkpoints at steps 2 and 4
    step2 = tmp_path / 'full' / 'ckpt' / 'step_000002'
    assert (step2 / 'state.safetensors').exists() and not (step2 / 'state.pt').exists()
    run(tmp_path / 'resumed', resume_from=str(step2))
    assert losses(tmp_path / 'resumed') == losses(tmp_path / 'full')[2:] and len(losses(tmp_path / 'resumed')) == 2


# --- hostile review follow-ups (issue #11) ---

def test_memory_check_refuses_before_writing(shards, tmp_path, monkeypatch):
    "The 72B preset (and a tiny model when little memory is left) is refused with the estimate; nothing is written."
    import qwen_edu.config
    from qwen_edu.config import NotEnoughMemoryError
    big = TrainConfig(data=str(shards), out=str(tmp_path / 'big'), preset='qwen2.5-72b', batch_size=1, seq_len=16,
                      max_steps=8, progress=False)
    with pytest.raises(NotEnoughMemoryError, match=r'training qwen2\.5-72b at batch 1 x 16 needs about .*--no-memory-check'):
        train(big)
    assert not (tmp_path / 'big').exists()
    monkeypatch.setattr(qwen_edu.config, 'available_memory', lambda device='cpu': 10_000)
    with pytest.raises(MemoryError, match=r'needs about .* 10 kB available'): train(cfg_for(shards, tmp_path / 'tiny'))
    assert not (tmp_path / 'tiny').exists()
    assert train(cfg_for(shards, tmp_path / 'tiny', max_steps=2, memory_check=False)).step == 2
    assert train_parser().parse_args(['--no-memory-check']).memory_check is False
    assert 'memory_check' not in T.RESUME_FIELDS


def test_float32_overflowing_values_are_refused(shards, tmp_path):
    "Finite values that overflow float32 (lr, or AdamW's first step lr / (1 - beta1)) are refused, not a RuntimeError."
    for kw, field in [(dict(lr=1e39), 'lr'), (dict(lr=3e38), 'lr'), (dict(lr=1e36, beta1=0.999), 'lr'),
                      (dict(weight_decay=1e39), 'weight_decay'), (dict(lr=1.0, weight_decay=1e39), 'weight_decay'),
                      (dict(grad_clip=1e39), 'grad_clip'), (dict(rope_theta=1e39), 'rope_theta'),
                      (dict(peak_flops=1e39), 'peak_flops')]:
        with pytest.raises(ValueError, match=rf'{field}.*float32'): T.check_train_config(TrainConfig(**kw))
    T.check_train_config(TrainConfig(lr=1e30, rope_theta=1e30))  # large is fine while it fits
    with pytest.raises(ValueError, match='float32'): train(cfg_for(shards, tmp_path / 'run', lr=1e39))
    assert not (tmp_path / 'run').exists()


def _tamper_state(ck, **fields):
    "Rewrite entries of state.json and recompute the checksums (what a hand edit with sha256 recomputed does)."
    import hashlib
    doc = json.loads((ck / 'state.json').read_text()); doc.update(fields)
    (ck / 'state.json').write_text(json.dumps(doc))
    info = json.loads((ck / 'complete.json').read_text())
    info['sha256']['state.json'] = hashlib.sha256((ck / 'state.json').read_bytes()).hexdigest()
    (ck / 'complete.json').write_text(json.dumps(info))


def test_tampered_state_schema_is_a_clear_error(shards, tmp_path):
    "A state.json with a NaN step or a model_config that QwenConfig rejects is 'unreadable', naming the file."
    train(cfg_for(shards, tmp_path / 'run', stop_at_step=2))
    ck = latest_checkpoint(tmp_path / 'run' / 'ckpt')
    good = (ck / 'state.json').read_text(), (ck / 'complete.json').read_text()
    for fields in (dict(step={'__float__': 'nan'}), dict(step=-1), dict(step='2'), dict(step=True),
                   dict(model_config={'__items__': [[1, 2]]}), dict(model_config={'hidden_sise': 32}),
                   dict(model_config={'hidden_size': 'x'}), dict(model_config=[1]), dict(config=[1]),
                   dict(optimizer=None), dict(rng={'python': 1}), dict(batch_size=-3)):
        _tamper_state(ck, **fields)
        with pytest.raises(ValueError, match=r'step_000002 holds an unreadable training state.*--resume-from'):
            train(cfg_for(shards, tmp_path / 'run', resume=True))
        if 'model_config' in fields or 'step' in fields:
            with pytest.raises(ValueError, match='unreadable training state'): T.load_trained_model(tmp_path / 'run')
        (ck / 'state.json').write_text(good[0]); (ck / 'complete.json').write_text(good[1])
    assert train(cfg_for(shards, tmp_path / 'run', resume=True)).step == 6


def test_run_cli_reports_network_errors(capsys):
    "An offline dataset download (ConnectionError, TimeoutError) is a one-line error, exit 1."
    for exc in (ConnectionError('cannot reach the hub for nonexist/dataset; check the network'), TimeoutError('timed out')):
        def fn(argv, exc=exc): raise exc
        assert T.run_cli(fn, [], prog='qwen-edu data') == 1
        err = capsys.readouterr().err
        assert err.startswith(f'qwen-edu data: error: {exc}') and 'Traceback' not in err


def test_refused_or_diverged_resume_keeps_train_config(shards, tmp_path, monkeypatch):
    "train_config.json keeps describing the run that wrote the checkpoints: a refused or diverged resume leaves it."
    import qwen_edu.config
    run = tmp_path / 'run'
    train(cfg_for(shards, run, stop_at_step=2))
    before = (run / 'train_config.json').read_text()
    with pytest.raises(ValueError, match='float32'): train(cfg_for(shards, run, resume=True, lr=1e39, allow_config_change='lr'))
    with pytest.raises(ValueError, match='lr: 0.003 -> 0.5'): train(cfg_for(shards, run, resume=True, lr=0.5))
    with monkeypatch.context() as m:
        m.setattr(qwen_edu.config, 'available_memory', lambda device='cpu': 10_000)
        with pytest.raises(MemoryError): train(cfg_for(shards, run, resume=True))
    assert (run / 'train_config.json').read_text() == before
    real = T.next_token_loss
    monkeypatch.setattr(T, 'next_token_loss', lambda model, x, y: real(model, x, y) * float('nan'))
    with pytest.raises(FloatingPointError, match='step_000002'):
        train(cfg_for(shards, run, resume=True, lr=0.5, allow_config_change='lr'))
    assert (run / 'train_config.json').read_text() == before
    monkeypatch.undo()
    r = train(cfg_for(shards, run, resume=True, lr=0.001, allow_config_change='lr'))  # a resume that saves updates it
    assert r.step == 6 and json.loads((run / 'train_config.json').read_text())['lr'] == 0.001


def test_device_cuda_index(shards, tmp_path):
    "--device cuda:N is accepted like chat's; without CUDA it is a clear error before anything is written."
    for d in ('auto', 'cpu', 'cuda', 'cuda:0', 'cuda:3'): T.check_train_config(TrainConfig(device=d))
    for d in ('gpu', 'cuda:', 'cuda:x', 'cuda:-1', 'cuda0'):
        with pytest.raises(ValueError, match='device must be'): T.check_train_config(TrainConfig(device=d))
    if torch.cuda.is_available(): pytest.skip('a GPU is visible')
    for d in ('cuda', 'cuda:0'):
        with pytest.raises(ValueError, match=rf'--device {d} but torch has no CUDA device here.*use --device cpu'):
            train(cfg_for(shards, tmp_path / 'run', device=d))
    assert not (tmp_path / 'run').exists()


def test_activation_checkpointing_flag_trains_the_same(shards, tmp_path):
    "--activation-checkpointing recomputes blocks in the backward: the same losses (fp32, CPU) as without it."
    train(cfg_for(shards, tmp_path / 'a', max_steps=4, log_every=1))
    b = train(cfg_for(shards, tmp_path / 'b', max_steps=4, log_every=1, activation_checkpointing=True))
    la = [m['loss'] for m in read_metrics(tmp_path / 'a' / 'metrics.jsonl')]
    lb = [m['loss'] for m in read_metrics(tmp_path / 'b' / 'metrics.jsonl')]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5) and b.model.model.activation_checkpointing


_EVAL_RSS_SCRIPT = r'''
import resource, torch
torch.set_num_threads(2)
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.train import evaluate
c = QwenConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0); m = QwenForCausalLM(c)
x = torch.randint(0, c.vocab_size, (2, 2049))
evaluate(m, [(x[:, :8], x[:, 1:9])], 'cpu')  # warm up the libraries
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r = evaluate(m, [(x[:, :-1], x[:, 1:])], 'cpu', token_bytes=torch.ones(c.vocab_size, dtype=torch.float64))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, r['val_loss'])
'''


def test_evaluation_never_holds_the_full_logits():
    "Validation of 4,096 tokens at vocabulary 151,936 (full fp32 logits: 2.5 GB) grows the peak RSS by < 0.6 GB."
    import subprocess, sys, os
    r = subprocess.run([sys.executable, '-c', _EVAL_RSS_SCRIPT], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '2'}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    grown, loss = r.stdout.split()
    assert int(grown) < 0.6e9, f"peak RSS grew by {int(grown) / 1e9:.2f} GB"
    assert abs(float(loss) - math.log(151936)) < 0.1  # a random model: about log(vocab)
