"""The one training loop (qwen_edu.engine.fit): accumulation, schedule, batches on the device, evaluation cadence,
divergence, and that every stage (pre-training, SFT, reward model, DPO, GRPO) trains through it with AdamW groups
that never decay norms or biases."""
import math
import pytest, torch
import torch.nn as nn
import qwen_edu.engine as E
from qwen_edu.engine import LoopConfig, fit, to_device, Prefetcher, loop_config, stage_device, lr_at


def linear_task(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


def test_grad_accumulation_equals_the_full_batch():
    "2 micro-batches of 16 per step == 1 batch of 32 (the losses are means over equal halves), step for step."
    x, y = linear_task()
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    runs = {}
    for A in (1, 2):
        torch.manual_seed(0); m = nn.Linear(3, 1)
        cfg = LoopConfig(max_steps=8, lr=0.05, grad_accum=A, log_every=1, device='cpu', warmup_steps=2)
        half = len(x) // A
        r = fit(m, cfg, mse, lambda i: (x[(i % A) * half:(i % A + 1) * half], y[(i % A) * half:(i % A + 1) * half]))
        runs[A] = ([h['loss'] for h in r.history], m.weight.detach().clone())
    assert runs[1][0] == pytest.approx(runs[2][0], rel=1e-6) and torch.allclose(runs[1][1], runs[2][1], atol=1e-6)
    assert runs[1][0][-1] < runs[1][0][0]


def test_schedule_is_applied_and_logged():
    x, y = linear_task()
    r = fit(nn.Linear(3, 1), LoopConfig(max_steps=10, lr=0.1, warmup_steps=3, log_every=1, device='cpu'),
            lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), lambda i: (x, y))
    assert [h['lr'] for h in r.history] == pytest.approx([lr_at(s, 10, 0.1, 3) for s in range(10)])
    assert [h['step'] for h in r.history] == list(range(1, 11)) and r.step == 10


def test_evaluation_cadence_and_extra_metrics():
    x, y = linear_task()
    seen = []
    def loss_fn(m, b):
        l = ((m(b[0]) - b[1]) ** 2).mean()
        return l, {'abs_err': (m(b[0]) - b[1]).abs().mean()}
    r = fit(nn.Linear(3, 1), LoopConfig(max_steps=6, lr=0.1, eval_every=3, log_every=2, device='cpu'), loss_fn,
            lambda i: (x, y), eval_fn=lambda m: seen.append(m.training) or {'score': 1.0}, eval_at_start=True)
    assert [e['step'] for e in r.evals] == [0, 3, 6] and seen == [False, False, False]  # evaluated in eval mode
    assert [h['step'] for h in r.history] == [2, 3, 4, 6] and all('abs_err' in h for h in r.history)
    assert r.history[1]['score'] == 1.0


def test_divergence_stops_with_the_step():
    x, y = linear_task()
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean() * (float('nan') if b[2] >= 3 else 1.0)
    with pytest.raises(FloatingPointError, match='step 4'):
        fit(nn.Linear(3, 1), LoopConfig(max_steps=8, lr=0.1, log_every=1, device='cpu'), loss_fn, lambda i: (x, y, i))


def test_batches_go_to_the_device_and_prefetch_keeps_order():
    b = {'a': torch.ones(2), 'b': (torch.zeros(1), 'text', [1, 2])}
    out = to_device(b, torch.device('cpu'))
    assert out['a'] is b['a'] and out['b'][1] == 'text' and out['b'][2] == [1, 2]
    p = Prefetcher(lambda i: torch.tensor([i]), iter(range(5)), torch.device('cpu'))
    assert [next(p).item() for _ in range(5)] == [0, 1, 2, 3, 4]
    def broken(i):
        if i == 2: raise ValueError('bad batch 2')
        return torch.tensor([i])
    p = Prefetcher(broken, iter(range(5)), torch.device('cpu'))
    next(p); next(p)
    with pytest.raises(ValueError, match='bad batch 2'): next(p)


def test_stage_device_is_where_the_model_is():
    m = nn.Linear(2, 2)
    assert stage_device(m) == 'cpu' and stage_device(m, 'cuda') == 'cuda'
    cfg = loop_config(m, 5, 1e-3, schedule='constant')
    assert (cfg.device, cfg.max_steps, cfg.log_every, cfg.schedule) == ('cpu', 5, 1, 'constant')


def _no_decay_on_vectors(opt):
    "Every 1-d parameter (norm gains, biases) sits in a group with weight_decay 0."
    groups = [(g['weight_decay'], p) for g in opt.param_groups for p in g['params']]
    assert groups and all(wd == 0.0 for wd, p in groups if p.dim() < 2)
    return {wd for wd, p in groups if p.dim() >= 2}


def test_every_stage_trains_through_the_engine_without_decay_on_norms(monkeypatch):
    "Pre-training on text, SFT, the reward model, DPO and GRPO each call engine.fit once per run; their optimizers"
    " leave norms and biases undecayed (two of the old loops decayed them)."
    from qwen_edu.sft import toy_model, train_task_tokenizer, sft_train, pretrain_on_text, pretraining_texts
    from qwen_edu.reward import RewardModel, make_preference_pairs, train_reward_model
    from qwen_edu.dpo import dpo_train
    from qwen_edu.grpo import grpo_train
    from qwen_edu.tasks import make_examples
    import copy
    calls, real_fit = [], E.fit
    def spy(model, cfg, loss_fn, batch_fn, **kw):
        r = real_fit(model, cfg, loss_fn, batch_fn, **kw)
        calls.append((kw.get('desc'), cfg))
        return r
    monkeypatch.setattr(E, 'fit', spy)
    opts, real_make = [], E.make_optimizer
    monkeypatch.setattr(E, 'make_optimizer', lambda m, cfg: opts.append(real_make(m, cfg)) or opts[-1])
    tok = train_task_tokenizer(vocab_size=320, n=100)
    torch.manual_seed(0)
    m = toy_model(tok, hidden_size=32)
    pretrain_on_text(m, tok, pretraining_texts(50), steps=2, batch_size=4, seq_len=32)
    exs = make_examples('arith', 20, seed=0)
    sft_train(m, tok, exs, steps=2, batch_size=4)
    pairs = make_preference_pairs(None, tok, exs)
    train_reward_model(RewardModel.from_causal_lm(m), tok, pairs, steps=2, batch_size=4)
    hist = dpo_train(copy.deepcopy(m), tok, pairs, ref_model=m, steps=2, batch_size=4, eval_pairs=pairs[:4], eval_every=1)
    grpo_train(copy.deepcopy(m), m, tok, exs[:4], steps=2, group_size=2, queries_per_step=2, max_new_tokens=4)
    assert [d for d, _ in calls] == ['pretrain', 'sft', 'reward', 'dpo', 'grpo']
    assert [h['step'] for h in hist] == [0, 1, 2]
    assert len(opts) == 4  # every stage but DPO, whose default optimizer is make_dpo_optimizer('adamw')
    assert {0.1} == _no_decay_on_vectors(opts[0]) == _no_decay_on_vectors(opts[1])
    from qwen_edu.dpo import make_dpo_optimizer
    assert _no_decay_on_vectors(make_dpo_optimizer(toy_model(tok, hidden_size=32), 'adamw', weight_decay=0.1)) == {0.1}
    assert _no_decay_on_vectors(opts[2]) == {0.1} and _no_decay_on_vectors(opts[3]) == {0.0}  # reward; GRPO (no decay)


def test_cpu_threads_follow_the_setting(monkeypatch):
    "An explicit cpu_threads is applied on the CPU; None leaves the choice to configure_cpu_threads (A3), which"
    " OMP_NUM_THREADS overrides (the tests set it, so the count stays fixed here)."
    x, y = linear_task()
    n = torch.get_num_threads()
    try:
        fit(nn.Linear(3, 1), LoopConfig(max_steps=1, cpu_threads=1, device='cpu'), lambda m, b: m(b[0]).sum(), lambda i: (x, y))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(n)
        fit(nn.Linear(3, 1), LoopConfig(max_steps=1, device='cpu'), lambda m, b: m(b[0]).sum(), lambda i: (x, y))
        assert torch.get_num_threads() == n
        monkeypatch.delenv('OMP_NUM_THREADS'); monkeypatch.setattr('os.getloadavg', lambda: (50.0, 50.0, 50.0))
        fit(nn.Linear(3, 1), LoopConfig(max_steps=1, device='cpu'), lambda m, b: m(b[0]).sum(), lambda i: (x, y))
        assert torch.get_num_threads() == 1  # a machine loaded far beyond its CPUs: one thread, no spinning
    finally: torch.set_num_threads(n)


def test_compile_through_the_engine_returns_an_eager_model():
    "cfg.compile compiles each block for the steps (aot_eager here, as the CPU compile tests) and hands back an eager model."
    from qwen_edu.config import QwenConfig
    from qwen_edu.model import QwenForCausalLM
    torch.manual_seed(0)
    mc = QwenConfig.from_preset('edu-tiny', vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 64, (2, 16))
    losses = {}
    for comp in (False, True):
        torch.manual_seed(0); m = QwenForCausalLM(mc)
        import qwen_edu.distributed as D
        real = D.apply_compile
        D.apply_compile = lambda model: real(model, backend='aot_eager')
        try:
            r = fit(m, LoopConfig(max_steps=3, lr=1e-2, compile=comp, log_every=1, device='cpu'),
                    lambda mm, b: mm(b, labels=b).loss, lambda i: x)
        finally: D.apply_compile = real
        losses[comp] = [h['loss'] for h in r.history]
        assert all(getattr(l, '_compiled_call_impl', None) is None for l in m.model.layers)
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_value_checks_run_on_the_first_step_only_and_come_back():
    """The first step range-checks the batches (a host sync per forward on a GPU); later steps check shapes only and
    build the padding mask without reading it back; the flag is restored when fit returns, and when it raises."""
    from qwen_edu.config import QwenConfig
    from qwen_edu.model import QwenForCausalLM
    torch.manual_seed(0)
    m = QwenForCausalLM(QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    x, seen = torch.randint(0, 64, (2, 16)), []
    def loss_fn(mm, b):
        seen.append(mm.model.check_values)
        return mm(b, labels=b, attention_mask=torch.ones_like(b)).loss
    fit(m, LoopConfig(max_steps=3, lr=1e-2, grad_accum=2, device='cpu'), loss_fn, lambda i: x)
    assert seen == [True, True, False, False, False, False] and m.model.check_values
    bad = lambda i: x if i < 2 else x + 64  # ids out of range from step 1 on
    with pytest.raises(IndexError):  # not read back by a check: the embedding lookup itself fails (on a CPU)
        fit(m, LoopConfig(max_steps=3, lr=1e-2, device='cpu'), lambda mm, b: mm(b, labels=b).loss, bad)
    assert m.model.check_values  # restored after the failure
    with pytest.raises(ValueError, match='token ids must be in'):  # the first step checks
        fit(m, LoopConfig(max_steps=3, lr=1e-2, device='cpu'), lambda mm, b: mm(b, labels=b).loss, lambda i: x + 64)


def _ranks_worker(rank, init_file, out):
    import json
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        x, y = linear_task()
        loss_fn = lambda m, b: (((m(b[0]) - b[1]) ** 2).mean(), {'rank_value': torch.tensor(float(rank))})
        r = fit(nn.Linear(3, 1), LoopConfig(max_steps=2, lr=0.1, log_every=1, device='cpu', progress=False), loss_fn,
                lambda i: (x, y), dist=(rank, 2, torch.device('cpu')))
        if rank == 0: open(out, 'w').write(json.dumps([h['rank_value'] for h in r.history]))
    finally: torch.distributed.destroy_process_group()


def test_extra_metrics_are_means_over_the_processes(tmp_path):
    "A metric each process reports (its rank here) is logged as the mean over the processes, as the loss is."
    import json, torch.multiprocessing as mp
    mp.spawn(_ranks_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'out.json')), nprocs=2)
    assert json.loads((tmp_path / 'out.json').read_text()) == [0.5, 0.5]
