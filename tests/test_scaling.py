"""Scaling laws: the sweep runner (resumable, atomic, clear errors) and fits that recover known answers (qwen_edu.scaling)."""
import dataclasses, math, os, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch

import qwen_edu.scaling as S
from qwen_edu.scaling import (SweepSpec, check_sweep, run_sweep, read_runs, COLUMNS, shape_params, shape_config,
                              isoflop_runs, fit_power_law, fit_power_law2, fit_loss_law, loss_law, optimal_allocation,
                              law_objective, law_params, parabola_min, isoflop_optima, fit_isoflop, optimal_hparam,
                              bootstrap, default_sweep, estimate_seconds, dense_equivalent, moe_multiplier, sweep_cli,
                              run_flops, write_runs)

DENSE = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1)
MOE = dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48)
EPOCH = dict(E=1.8, A=482.01, B=2085.43, alpha=0.35, beta=0.37)
TINY = dict(seq_len=32, eval_tokens=2048, train_kw=dict(warmup_steps=2))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    "A small built-in corpus (BPE vocabulary 512, ~240k train tokens), built once for the module."
    from qwen_edu.data import prepare_builtin_data
    return prepare_builtin_data(tmp_path_factory.mktemp('scaling') / 'builtin', vocab_size=512, corpus_size=600_000)


def micro(data, **kw):
    "Four tiny runs: dense and MoE, 16 and 32 steps of 4 x 32 tokens."
    return SweepSpec(**dict(dict(shapes=[DENSE, MOE], tokens=[2048, 4096], lrs=[3e-3], batch_sizes=[4], data=str(data),
                                 **TINY), **kw))


@pytest.fixture
def count_train(monkeypatch):
    "Count the calls run_sweep makes to train()."
    calls, real = [], S.train
    def counted(cfg, model_config=None):
        calls.append(cfg)
        return real(cfg, model_config)
    monkeypatch.setattr(S, 'train', counted)
    return calls


def test_counts_match_the_model():
    from qwen_edu.model import QwenForCausalLM
    for s in (DENSE, MOE):
        m = QwenForCausalLM(shape_config(s, vocab_size=256))
        n, act = shape_params(s)
        assert n == sum(p.numel() for k, p in m.named_parameters() if 'embed_tokens' not in k)
        assert (act == n) if s is DENSE else (act < n)


def test_micro_sweep_writes_rows_then_resumes(data_dir, tmp_path, count_train, one_torch_thread):
    out = tmp_path / 'sweep'
    df = run_sweep(micro(data_dir), out, cpu_threads=1, verbose=False)
    assert len(count_train) == 4
    csv = read_runs(out / 'runs.csv')
    assert list(csv.columns) == list(COLUMNS) and len(csv) == 4 and list(df.run_id) == list(csv.run_id)
    assert (csv.tokens == csv.steps * csv.batch_size * csv.seq_len).all() and list(csv.steps) == [16, 32, 16, 32]
    assert (csv.batch_tokens == 4 * 32).all() and (csv.flops == 6 * csv.n_active * csv.tokens).all()
    assert (csv.flops_total > csv.flops).all()                   # + lm_head and attention
    moe, dense = csv[csv.arch == 'moe'], csv[csv.arch == 'dense']
    assert (moe.n_active < moe.n_params).all() and (dense.n_active == dense.n_params).all()
    assert csv.val_loss.between(1, math.log(512) + 0.5).all() and not csv.diverged.any()
    assert (csv.groupby('arch').val_loss.agg(lambda s: s.iloc[1] < s.iloc[0])).all()  # more tokens, lower loss
    assert not list((out / 'runs').glob('*/ckpt'))               # checkpoints go once the row is written
    assert all((out / 'runs' / r / 'metrics.jsonl').exists() for r in csv.run_id)
    before = (out / 'runs.csv').read_text()
    again = run_sweep(micro(data_dir), out, cpu_threads=1, verbose=False)   # the same spec: nothing to train
    assert len(count_train) == 4 and (out / 'runs.csv').read_text() == before
    pd.testing.assert_frame_equal(again, df)
    more = dataclasses.replace(micro(data_dir), runs=[dict(DENSE, tokens=1024, lr=1e-2, batch_size=4)])
    df5 = run_sweep(more, out, cpu_threads=1, verbose=False)     # one more run: only it trains
    assert len(count_train) == 5 and len(df5) == 5 and count_train[-1].lr == 1e-2
    assert len(read_runs(out / 'runs.csv')) == 5
    text = (out / 'runs.csv').read_text()
    for bad, msg in ((dict(lrs=[-1.0]), r'lrs\[0\]: lr must be a finite number > 0'), (dict(tokens=[0]), 'tokens must be'),
                     (dict(tokens=[2048, 10]), 'less than one step'), (dict(train_kw=dict(warmup_steps=50)), 'warmup_steps'),
                     (dict(train_kw=dict(warmup=1)), "unknown TrainConfig field 'warmup'"),
                     (dict(shapes=[dict(DENSE, hidden=3)]), r"shapes\[0\]: unknown shape field 'hidden'")):
        with pytest.raises(ValueError, match=msg): run_sweep(micro(data_dir, **bad), out, verbose=False)
    assert (out / 'runs.csv').read_text() == text and len(count_train) == 5  # bad specs keep the finished rows


def test_builtin_data_and_an_unwritable_out_dir(tmp_path, one_torch_thread):
    (tmp_path / 'file').write_text('x')
    spec = SweepSpec(runs=[dict(DENSE, tokens=1024, lr=3e-3, batch_size=4)], vocab_size=300, corpus_size=200_000, **TINY)
    with pytest.raises(OSError, match='cannot write the sweep to'): run_sweep(spec, tmp_path / 'file' / 'sweep')
    df = run_sweep(spec, tmp_path / 'sweep', cpu_threads=1, verbose=False)   # 'builtin': built under out_dir/builtin
    assert (tmp_path / 'sweep' / 'builtin' / 'data' / 'meta.json').exists() and df.val_loss.notna().all()


class Killed(BaseException): "A kill (SIGKILL, Ctrl-C) in the middle of a run."


def test_killed_sweep_continues_and_a_cut_run_resumes_its_checkpoint(data_dir, tmp_path, monkeypatch, one_torch_thread):
    ref = run_sweep(micro(data_dir), tmp_path / 'ref', cpu_threads=1, verbose=False)
    real, calls = S.train, []
    def killed_in_run_3(cfg, model_config=None):                   # run 3 stops at step 8 of 16, as if killed there
        calls.append(cfg)
        if len(calls) == 3:
            real(dataclasses.replace(cfg, stop_at_step=8), model_config); raise Killed
        return real(cfg, model_config)
    monkeypatch.setattr(S, 'train', killed_in_run_3)
    with pytest.raises(Killed):
        run_sweep(micro(data_dir), tmp_path / 'cut', cpu_threads=1, ckpt_every=4, verbose=False)
    assert len(read_runs(tmp_path / 'cut' / 'runs.csv')) == 2
    calls.clear()
    monkeypatch.setattr(S, 'train', lambda cfg, model_config=None: (calls.append(cfg), real(cfg, model_config))[1])
    df = run_sweep(micro(data_dir), tmp_path / 'cut', cpu_threads=1, ckpt_every=4, verbose=False)
    assert [c.resume for c in calls] == [True, False]               # run 3 from its checkpoint, run 4 from scratch
    np.testing.assert_array_equal(df.val_loss, ref.val_loss)        # resuming is exact: the same losses


SWEEP_SCRIPT = """
import sys
from qwen_edu.scaling import SweepSpec, run_sweep
from qwen_edu.train import run_ranks
spec = SweepSpec(**eval(sys.argv[1]))
run_ranks(lambda: run_sweep(spec, sys.argv[2], cpu_threads=1, verbose=False), 'sweep')
"""


def test_torchrun_sweep_equals_one_process(data_dir, tmp_path, one_torch_thread):
    "Under torchrun x2 (gloo) with a fixed micro_batch_size, the sweep trains what one process trains (1e-5)."
    kw = dict(shapes=[DENSE, MOE], tokens=[2048], lrs=[3e-3], batch_sizes=[4], micro_batch_size=2, data=str(data_dir),
              **TINY)
    one = run_sweep(SweepSpec(**kw), tmp_path / 'one', cpu_threads=1, verbose=False)
    (tmp_path / 'sweep.py').write_text(SWEEP_SCRIPT)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                        str(tmp_path / 'sweep.py'), repr(kw), str(tmp_path / 'two')],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_runs(tmp_path / 'two' / 'runs.csv')
    assert list(two.run_id) == list(one.run_id)                      # the same runs: ids do not depend on processes
    np.testing.assert_allclose(two.val_loss, one.val_loss, atol=1e-5)
    np.testing.assert_allclose(two.train_loss, one.train_loss, atol=1e-5)


def test_diverged_run_is_a_row_not_a_rerun(data_dir, tmp_path, monkeypatch, one_torch_thread):
    def diverge(cfg, model_config=None): raise FloatingPointError('training diverged')
    monkeypatch.setattr(S, 'train', diverge)
    spec = SweepSpec(runs=[dict(DENSE, tokens=1024, lr=10.0, batch_size=4)], data=str(data_dir), **TINY)
    df = run_sweep(spec, tmp_path, verbose=False)
    assert bool(df.diverged.iloc[0]) and np.isnan(df.val_loss.iloc[0])
    monkeypatch.setattr(S, 'train', lambda *a, **k: pytest.fail('re-ran a run that has a row'))
    run_sweep(spec, tmp_path, verbose=False)


def test_csv_write_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / 'runs.csv'
    S.write_runs(pd.DataFrame([dict(run_id='a', val_loss=1.0)]), p)
    def crash(*a): raise OSError('disk full')
    monkeypatch.setattr(S.os, 'replace', crash)
    with pytest.raises(OSError):
        S.write_runs(pd.DataFrame([dict(run_id='a', val_loss=1.0), dict(run_id='b', val_loss=2.0)]), p)
    assert list(read_runs(p).run_id) == ['a']


def test_spec_errors_name_the_field():
    ok = dict(DENSE, tokens=4096, lr=1e-3, batch_size=4)
    cases = [(SweepSpec(runs=[dict(ok, lr=float('inf'))]), r'runs\[0\]: lr must be a finite number > 0'),
             (SweepSpec(runs=[dict(ok, lr='fast')]), 'lr must be'),
             (SweepSpec(runs=[dict(ok, tokens=-5)]), 'tokens must be'),
             (SweepSpec(runs=[dict(ok, batch_size=2.5)]), 'batch_size must be a positive integer'),
             (SweepSpec(runs=[dict(ok, step=3)]), "unknown field 'step'"),
             (SweepSpec(runs=[{k: v for k, v in ok.items() if k != 'lr'}]), 'missing lr'),
             (SweepSpec(shapes=[DENSE], tokens=[4096], lrs=[1e-3]), 'batch_sizes is empty'),
             (SweepSpec(), 'no runs'), (SweepSpec(runs=[ok], seq_len=0), 'seq_len must be a positive integer'),
             (SweepSpec(runs=[ok], preset='nope'), "unknown preset 'nope'"),
             (SweepSpec(runs=[ok], train_kw=dict(seed=3)), 'which the sweep sets per run'),
             (SweepSpec(runs=[dict(ok, hidden_size=33)]), 'not divisible by num_attention_heads'),
             (SweepSpec(runs=[dict(ok, budget=-1e12)]), 'budget must be')]
    for spec, msg in cases:
        with pytest.raises(ValueError, match=msg): check_sweep(spec)
    with pytest.raises(ValueError, match="unknown SweepSpec field 'budgets'"): SweepSpec.from_dict(dict(budgets=[1e12]))
    assert len(check_sweep(SweepSpec(runs=[ok, dict(ok, tokens=4100)]))) == 1  # the same steps: the same run


def test_isoflop_runs_spend_the_budget():
    runs = check_sweep(SweepSpec(runs=isoflop_runs([DENSE, MOE], [1e10, 3e10], 1e-3, 4, seq_len=32), seq_len=32))
    assert {r['arch'] for r in runs} == {'dense', 'moe'}
    for r in runs:
        assert r['tokens'] == pytest.approx(r['budget'] / (6 * shape_params(r['shape'])[1]), abs=4 * 32)


def test_power_laws_and_parabolas_recover_known_values():
    rng = np.random.default_rng(1)
    C = np.logspace(15, 21, 15)
    k, e = fit_power_law(C, 0.2 * C**0.49 * np.exp(rng.normal(0, 0.03, C.size)))
    assert e == pytest.approx(0.49, abs=0.01) and k == pytest.approx(0.2, rel=0.2)
    N, D = np.exp(rng.uniform(14, 21, 50)), np.exp(rng.uniform(20, 27, 50))
    k, eN, eD = fit_power_law2(N, D, 1.79 * N**-0.713 * D**0.307 * np.exp(rng.normal(0, 0.03, 50)))
    assert (eN, eD) == pytest.approx((-0.713, 0.307), abs=0.02) and k == pytest.approx(1.79, rel=0.3)
    x = np.linspace(-2, 3, 11)
    assert parabola_min(x, 2 * (x - 0.7)**2 + 1.5 + rng.normal(0, 1e-3, x.size)) == pytest.approx((0.7, 1.5), abs=1e-2)
    assert all(np.isnan(parabola_min(x, -x**2))) and all(np.isnan(parabola_min([1, 1, 2], [1, 2, 3])))
    with pytest.raises(ValueError, match='two distinct x'): fit_power_law([3, 3], [1, 2])


def synthetic_isoflop(budgets, per=7, noise=0.005, seed=0):
    r = np.random.default_rng(seed); rows = []
    for C in budgets:
        n0 = optimal_allocation(C, **EPOCH)[0]
        for N in n0 * np.logspace(-1, 1, per):
            L = loss_law(N, C / (6 * N), **EPOCH) * np.exp(r.normal(0, noise))
            rows.append(dict(budget=C, n_active=N, val_loss=L))
    return pd.DataFrame(rows)


def test_loss_law_fit_recovers_chinchilla_form():
    p = np.array([0.4, 5.0, 7.0, 0.3, 0.5])
    lnN, lnD = np.log(np.logspace(6, 9, 6)).repeat(6), np.tile(np.log(np.logspace(8, 11, 6)), 6)
    lnL = np.log(loss_law(np.exp(lnN), np.exp(lnD), **EPOCH)) + np.random.default_rng(2).normal(0, 0.01, lnN.size)
    g = law_objective(p, lnN, lnD, lnL)[1]
    f = lambda q: law_objective(q, lnN, lnD, lnL)[0]
    num = [(f(p + h) - f(p - h)) / 2e-6 for h in np.eye(5) * 1e-6]
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-8)
    fit = fit_loss_law(np.exp(lnN), np.exp(lnD), np.exp(lnL))
    assert fit['E'] == pytest.approx(1.8, abs=0.05)
    assert (fit['alpha'], fit['beta']) == pytest.approx((0.35, 0.37), abs=0.03)
    b = bootstrap(lambda d: fit_loss_law(d.N, d.D, d.L, n_starts=4, init=law_params(fit)),
                  dict(N=np.exp(lnN), D=np.exp(lnD), L=np.exp(lnL)), n_boot=40)   # warm start alone gets stuck
    for k in ('E', 'alpha', 'beta'): assert b.lo[k] <= EPOCH[k] <= b.hi[k], b


def test_isoflop_fit_recovers_the_allocation_exponent_with_an_interval():
    df = synthetic_isoflop(np.logspace(17, 21, 5))
    opt = isoflop_optima(df)
    assert opt.interior.all()
    np.testing.assert_allclose(np.log(opt.n_opt), np.log(optimal_allocation(opt.budget, **EPOCH)[0]), atol=0.15)
    a = EPOCH['beta'] / (EPOCH['alpha'] + EPOCH['beta'])
    assert fit_isoflop(df)['a'] == pytest.approx(a, abs=0.02)
    b = bootstrap(fit_isoflop, df, n_boot=200, groups='budget')
    assert b.lo['a'] <= a <= b.hi['a'] and b.lo['b'] <= 1 - a <= b.hi['b'] and b.n_ok['a'] > 150
    with pytest.raises(ValueError, match='at least two budgets'): fit_isoflop(df[df.budget == df.budget.iloc[0]])


def test_optimal_lr_and_batch_recover_their_laws():
    r = np.random.default_rng(3); rows = []
    for N, D in [(N, D) for N in (1e7, 1e8, 1e9) for D in (1e9, 1e10, 1e11)]:
        eta, bopt = 1.79 * N**-0.713 * D**0.307, 0.58 * D**0.571
        for f in 2.0**np.arange(-3, 4):
            rows.append(dict(arch='dense', n_active=N, tokens=D, batch_tokens=2**20, lr=eta * f,
                             val_loss=3 + 0.05 * np.log(f)**2 + r.normal(0, 0.002)))
            rows.append(dict(arch='dense', n_active=N, tokens=D, batch_tokens=bopt * f, lr=1e-3,
                             val_loss=3 + 0.05 * np.log(f)**2 + r.normal(0, 0.002)))
    df = pd.DataFrame(rows)
    lr = optimal_hparam(df[df.batch_tokens == 2**20])
    assert lr.interior.all() and len(lr) == 9
    _, eN, eD = fit_power_law2(lr.n_active, lr.tokens, lr.lr_opt)
    assert (eN, eD) == pytest.approx((-0.713, 0.307), abs=0.03)
    bs = optimal_hparam(df[df.lr == 1e-3], x='batch_tokens', by=('arch', 'n_active', 'tokens', 'lr'))
    k, eD = fit_power_law(bs.tokens, bs.batch_tokens_opt)
    assert eD == pytest.approx(0.571, abs=0.03) and k == pytest.approx(0.58, rel=0.5)
    one = df[(df.batch_tokens == 2**20) & (df.n_active == 1e7) & (df.tokens == 1e9)]
    edge = optimal_hparam(one.assign(val_loss=np.log(one.lr / one.lr.max() / 100)**2))  # best beyond the largest lr
    assert list(edge.interior) == [False] and edge.lr_opt.iloc[0] == one.lr.max()
    assert optimal_hparam(one.iloc[:2]).empty                       # fewer than min_runs rates: no estimate


def test_default_sweep_is_about_an_hour_of_dense_and_moe_isoflops():
    spec = default_sweep()
    runs = check_sweep(spec)
    assert len(runs) >= 60
    iso = [r for r in runs if r['budget'] is not None]
    for arch in ('dense', 'moe'):
        assert len({r['budget'] for r in iso if r['arch'] == arch}) >= 4
    assert 40 * 60 <= estimate_seconds(spec) <= 80 * 60
    assert max(r['tokens'] for r in runs) <= 5_000_000                # within one pass of the 5.1M-token corpus
    hp = pd.DataFrame([dict(n=r['shape']['hidden_size'], tokens=r['tokens'], lr=r['lr'], B=r['batch_size'])
                       for r in runs if r['budget'] is None])
    lr_groups = hp[hp.B == 16].groupby(['n', 'tokens']).lr.nunique()
    assert len(lr_groups) == 6 and (lr_groups == 5).all()
    total = [r for r in iso if r['budget_kind'] == 'total']
    assert {r['arch'] for r in total} == {'dense'} and len({r['budget'] for r in total}) >= 4
    assert (hp[hp.lr == 3e-3].groupby(['n', 'tokens']).B.nunique().max() == 5)  # equal tokens at every batch size


def test_isoflop_runs_in_total_flops():
    runs = check_sweep(SweepSpec(runs=isoflop_runs([DENSE, MOE], [1e10, 3e10], 1e-3, 4, seq_len=32, kind='total',
                                                   vocab_size=512), seq_len=32))
    assert len(runs) == 4 and {r['budget_kind'] for r in runs} == {'total'}
    for r in runs:  # the lm_head over the vocabulary and attention count: fewer tokens than 6 N D would give
        per_token = shape_config(r['shape'], vocab_size=512, seq_len=32).flops_per_token(32)
        assert r['tokens'] == pytest.approx(r['budget'] / per_token, abs=4 * 32)
        assert r['tokens'] < r['budget'] / (6 * shape_params(r['shape'])[1])
    with pytest.raises(ValueError, match="kind must be one of"): isoflop_runs([DENSE], [1e10], 1e-3, 4, kind='6nd')
    with pytest.raises(ValueError, match=r"budgets\[1\] must be"): isoflop_runs([DENSE], [1e10, -3e10], 1e-3, 4)
    with pytest.raises(ValueError, match="budget_kind must be one of"):  # a kind without a budget means nothing
        check_sweep(SweepSpec(runs=[dict(DENSE, tokens=4096, lr=1e-3, batch_size=4, budget_kind='total')], seq_len=32))
    old = check_sweep(SweepSpec(runs=isoflop_runs([DENSE], [1e10], 1e-3, 4, seq_len=32), seq_len=32))
    assert old[0]['budget_kind'] == '6ND'


def test_read_runs_fills_columns_an_older_table_lacks(tmp_path):
    rows = []
    for s, D in ((DENSE, 8192), (MOE, 16384)):
        mc = shape_config(s, vocab_size=2048, seq_len=128)
        flops, flops_total = run_flops(mc, D, 128)
        rows.append(dict(run_id=f"r{D}", arch='moe' if s is MOE else 'dense', n_params=mc.num_params(non_embedding=True),
                         n_active=mc.num_active_params(non_embedding=True), tokens=D, seq_len=128, flops=flops,
                         flops_total=flops_total, budget=1e12 if s is DENSE else np.nan,
                         **{k: getattr(mc, k) for k in S.SHAPE_FIELDS}))
    pd.DataFrame(rows).to_csv(tmp_path / 'runs.csv', index=False)
    df = read_runs(tmp_path / 'runs.csv')
    assert df.budget_kind.iloc[0] == '6ND' and pd.isna(df.budget_kind.iloc[1])
    want = [shape_params(s)[1] + 2048 * s['hidden_size'] for s in (DENSE, MOE)]
    assert list(df.n_compute) == want  # solved back from flops_total: the activated parameters plus the lm_head


def test_isoflop_vertex_tokens_from_the_runs():
    rows = [dict(budget=C, n_active=N, tokens=C / (6 * N), val_loss=loss_law(N, C / (6 * N), **EPOCH))
            for C in (1e18, 1e19) for N in np.logspace(7, 9, 9)]
    df = pd.DataFrame(rows)
    a, b = isoflop_optima(df), isoflop_optima(df, d='tokens')  # tokens interpolated at the vertex = C / (6 N_opt)
    np.testing.assert_allclose(b.d_opt, a.d_opt, rtol=1e-9)
    np.testing.assert_allclose(b.n_opt, optimal_allocation(b.budget, **EPOCH)[0], rtol=0.1)


def test_dense_equivalent_and_moe_multiplier():
    N, D = np.logspace(6, 8, 10), np.logspace(9, 11, 10)
    L = loss_law(3.0 * N, D, **EPOCH)
    np.testing.assert_allclose(dense_equivalent(L, D, **EPOCH), 3.0 * N, rtol=1e-6)
    assert moe_multiplier(EPOCH, N, D, L) == pytest.approx(3.0, rel=1e-3)
    assert moe_multiplier(EPOCH, N, D, loss_law(N, D, **EPOCH)) == pytest.approx(1.0, rel=1e-3)
    assert np.isnan(dense_equivalent(EPOCH['E'], 1e12, **EPOCH))
    with pytest.raises(ValueError, match='same length'): moe_multiplier(EPOCH, N, D, L[:-1])
    with pytest.raises(ValueError, match='finite and > 0'): moe_multiplier(EPOCH, -N, D, L)


def test_sweep_cli_runs_resumes_and_refuses_bad_specs(data_dir, tmp_path, capsys, count_train, one_torch_thread):
    import json
    spec = tmp_path / 'spec.json'
    spec.write_text(json.dumps(dict(shapes=[DENSE], tokens=[2048], lrs=[3e-3], batch_sizes=[4], data=str(data_dir),
                                    **TINY)))
    out = tmp_path / 'sw'
    assert sweep_cli([str(out), '--spec', str(spec), '--dry-run']) == 0
    assert '1 left' in capsys.readouterr().out and not count_train
    assert sweep_cli([str(out), '--spec', str(spec), '--cpu-threads', '1']) == 0
    assert len(count_train) == 1 and len(read_runs(out / 'runs.csv')) == 1
    assert sweep_cli([str(out), '--spec', str(spec)]) == 0 and len(count_train) == 1  # nothing left to train
    assert '0 left' in (sweep_cli([str(out), '--spec', str(spec), '--dry-run']), capsys.readouterr().out)[1]
    for text, msg in (('{"budgets": [1]}', "unknown SweepSpec field 'budgets'"), ('{not json', 'not valid JSON'),
                      ('[1, 2]', 'JSON object'), (json.dumps(dict(shapes=[DENSE], tokens=[-5], lrs=[1e-3],
                                                                      batch_sizes=[4])), 'tokens')):
        spec.write_text(text)
        with pytest.raises(SystemExit): sweep_cli([str(out), '--spec', str(spec)])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit): sweep_cli([str(out), '--spec', str(tmp_path / 'nope.json')])
    assert 'does not exist' in capsys.readouterr().err
    assert len(read_runs(out / 'runs.csv')) == 1  # the finished row is kept


def test_a_gpu_sized_sweep_is_plain_arguments_and_round_trips_through_json(tmp_path, capsys):
    import json
    gpu = default_sweep(budgets=(), total_budgets=(), small_batch_budgets=(1e16, 1e17), total_sizes=((256, 4), (512, 8)),
                        batch_size=64, total_batch_size=64, seq_len=1024, max_tokens=None, vocab_size=32768,
                        lr_points=((384, 6, 2e8),), batch_shape=(512, 8), batch_tokens=(5e8,), batch_sizes=(32, 128),
                        data=str(tmp_path / 'gpu-data'), train_kw=dict(dtype='bf16'))
    runs = check_sweep(gpu)
    assert {r['budget_kind'] for r in runs if r['budget']} == {'total'} and len(runs) == 4 + 5 + 2
    assert all(r['tokens'] % (128 * 1024) == 0 for r in runs if r['budget'] is None)  # whole steps at every batch
    spec = tmp_path / 'gpu.json'
    spec.write_text(json.dumps(dataclasses.asdict(gpu)))
    assert sweep_cli([str(tmp_path / 'out'), '--spec', str(spec), '--dry-run']) == 0
    assert f"{len(runs)} runs: 0 done" in capsys.readouterr().out
