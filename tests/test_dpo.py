"""DPO: sequence log-probs, the sigmoid loss and implicit rewards equal the published formulas computed with loops;
gradients reach only the policy; the Online Merging Optimizer is AdamW when merging is off and follows the
OnDARE / OnTIES update rules when it is on; bad input fails clearly."""
import math
import pytest
import torch
from qwen_edu.dpo import OnlineMergingAdamW, dpo_loss, magnitude_mask, sequence_logps, token_logps


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def test_sequence_logps_matches_loop_and_ignores_masked_labels():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 6, 13
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    expect = []
    for b in range(B):
        s = 0.0
        for t in range(T):
            if mask[b, t]:
                z = logits[b, t].double()
                s += (z[labels[b, t]] - math.log(sum(math.exp(v) for v in z.tolist()))).item()
        expect.append(s)
    labels_pad = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    assert torch.allclose(sequence_logps(logits, labels_pad, mask), torch.tensor(expect, dtype=torch.float32), atol=1e-4)
    assert token_logps(logits.bfloat16(), labels).dtype == torch.float32


@pytest.mark.parametrize('beta', [0.1, 0.5])
def test_dpo_loss_matches_formula(beta):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta)
    expect = sum(math.log1p(math.exp(-beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item())) for i in range(16)) / 16
    assert abs(loss.item() - expect) < 1e-5
    assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rj, beta * (pr - rr))
    # equal policy and reference: loss log 2, zero rewards
    l0, c0, r0 = dpo_loss(pc, pr, pc, pr, beta=beta)
    assert abs(l0.item() - math.log(2)) < 1e-6 and torch.all(c0 == 0) and torch.all(r0 == 0)


def test_gradients_reach_only_the_policy():
    pc, pr = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    rc, rr = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    loss, cr, rj = dpo_loss(pc, pr, rc, rr)
    loss.backward()
    assert rc.grad is None and rr.grad is None and not cr.requires_grad and not rj.requires_grad
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # descent raises chosen, lowers rejected


def test_bad_inputs():
    x = torch.randn(4)
    with pytest.raises(ValueError, match='same shape'): dpo_loss(x, x[:3], x, x)
    with pytest.raises(ValueError, match='1-D'): dpo_loss(x[None], x[None], x[None], x[None])
    with pytest.raises(ValueError, match='empty batch'): dpo_loss(*(torch.zeros(0),) * 4)
    with pytest.raises(ValueError, match=r'expected logits \(B, T, V\)'):
        sequence_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))


def _models(seed=0):
    torch.manual_seed(seed)
    base, policy = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    return base, policy


def _grad_step(model, opt, x):
    opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()


def test_online_merging_without_merging_is_adamw():
    base, a = _models()
    b = torch.nn.Linear(6, 4); b.load_state_dict(a.state_dict())
    oa = OnlineMergingAdamW(a.parameters(), lr=3e-2, weight_decay=0.1, reserve_p=1.0, alpha=0.0, eps=1e-8)
    oa.set_task_vector(a, base)
    ob = torch.optim.AdamW(b.parameters(), lr=3e-2, weight_decay=0.1, eps=1e-8)
    x = torch.randn(32, 6)
    for _ in range(10): _grad_step(a, oa, x); _grad_step(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters()): assert torch.allclose(p, q, atol=1e-6)


def _adam_delta(p, grad, lr, eps=1e-8):
    # first AdamW step: m = (1-b1) g, v = (1-b2) g^2; bias-corrected update -lr * g / (|g| + eps)
    return -lr * grad / (grad.abs() + eps)


def test_ondare_merges_alpha_tau():
    base, pol = _models(1)
    tau = {n: (p - dict(base.named_parameters())[n]).detach().clamp(-1, 1) for n, p in pol.named_parameters()}
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    opt = OnlineMergingAdamW(pol.parameters(), lr=1e-2, reserve_p=1.0, alpha=0.3)
    opt.set_task_vector(pol, base)
    x = torch.randn(8, 6)
    pol.zero_grad(); pol(x).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in pol.named_parameters()}
    opt.step()
    for n, p in pol.named_parameters():
        expect = before[n] + 0.3 * tau[n] + 0.7 * _adam_delta(before[n], grads[n], 1e-2)
        assert torch.allclose(p, expect, atol=1e-6), n


def test_ondare_keeps_about_reserve_p_and_rescales():
    torch.manual_seed(0)
    lin, base = torch.nn.Linear(300, 100, bias=False), torch.nn.Linear(300, 100, bias=False)
    w0 = lin.weight.detach().clone()
    opt = OnlineMergingAdamW(lin.parameters(), lr=1e-3, reserve_p=0.2, alpha=0.0)
    opt.set_task_vector(lin, base)
    lin(torch.randn(4, 300)).sum().backward()
    g = lin.weight.grad.clone(); opt.step()
    changed = lin.weight != w0
    assert 0.17 < changed.float().mean().item() < 0.23
    expect = w0 + _adam_delta(w0, g, 1e-3) / 0.2
    assert torch.allclose(lin.weight[changed], expect[changed], atol=1e-6)


def test_onties_sign_election_and_magnitude_mask():
    torch.manual_seed(2)
    base, pol = _models(2)
    tau = {n: (p - dict(base.named_parameters())[n]).detach() for n, p in pol.named_parameters()}
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    opt = OnlineMergingAdamW(pol.parameters(), lr=1e-2, mode='onties', reserve_p=0.5, alpha=0.4, clip_val=10.0,
                             eps=0.05)  # a large eps gives distinct update magnitudes (no top-k ties)
    opt.set_task_vector(pol, base)
    pol.zero_grad(); pol(torch.randn(8, 6)).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in pol.named_parameters()}
    opt.step()
    for n, p in pol.named_parameters():
        t = tau[n].flatten(); k = max(1, int(0.5 * t.numel()))
        keep_t = torch.zeros_like(t); keep_t[t.abs().argsort(descending=True)[:k]] = 1
        t = t * keep_t
        d = _adam_delta(before[n], grads[n], 1e-2, eps=0.05).flatten()
        keep_d = torch.zeros_like(d); keep_d[d.abs().argsort(descending=True)[:k]] = 1
        d = d * keep_d
        upd = torch.zeros_like(t)
        for i in range(t.numel()):  # elementwise TIES: elect the sign of the sum, drop disagreeing entries
            s = 1.0 if t[i] + d[i] >= 0 else -1.0
            ti = t[i] if torch.sign(t[i]) == s else 0.0
            di = d[i] if torch.sign(d[i]) == s else 0.0
            upd[i] = 0.4 * ti + 0.6 * di
        assert torch.allclose(p.flatten(), before[n].flatten() + upd, atol=1e-6), n


def test_magnitude_mask():
    t = torch.tensor([0.1, -5.0, 2.0, -0.3])
    assert magnitude_mask(t, 0.5).tolist() == [0, 1, 1, 0]
    assert magnitude_mask(t, 0.01).tolist() == [0, 1, 0, 0] and magnitude_mask(t, 1.0).tolist() == [1, 1, 1, 1]


def test_online_merging_errors():
    base, pol = _models()
    with pytest.raises(ValueError, match="mode must be"): OnlineMergingAdamW(pol.parameters(), mode='ties')
    with pytest.raises(ValueError, match='reserve_p'): OnlineMergingAdamW(pol.parameters(), reserve_p=0)
    opt = OnlineMergingAdamW(pol.parameters())
    pol(torch.randn(2, 6)).sum().backward()
    with pytest.raises(RuntimeError, match='set_task_vector'): opt.step()
    with pytest.raises(ValueError, match='share an architecture'): opt.set_task_vector(pol, torch.nn.Linear(5, 4))


# ---- with a model ---------------------------------------------------------------------------------------------
import copy


@pytest.fixture(scope='module')
def tiny():
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer(vocab_size=300, n=60)
    torch.manual_seed(0)
    return tok, toy_model(tok, hidden_size=32).eval()


def test_completion_logps_matches_unpadded_per_sequence(tiny):
    from qwen_edu.dpo import completion_logps
    from qwen_edu.reward import make_preference_pairs, pair_batch
    from qwen_edu.sft import tokenize_conversation, example_messages
    tok, model = tiny
    pairs = make_preference_pairs(None, tok, make_examples_('word', 3))
    ids, attn, comp = pair_batch(tok, pairs)
    with torch.no_grad(): got = completion_logps(model, ids, attn, comp)
    side = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    exs = [p.example for p in pairs] * 2
    for i, (ex, r) in enumerate(zip(exs, side)):
        t, m = tokenize_conversation(tok, example_messages(ex, r))
        with torch.no_grad(): lp = torch.log_softmax(model(torch.tensor([t])).logits[0].double(), -1)
        expect = sum(lp[j - 1, t[j]].item() for j in range(1, len(t)) if m[j])
        assert abs(got[i].item() - expect) < 1e-3


def make_examples_(task, n):
    from qwen_edu.tasks import make_examples
    return make_examples(task, n, seed=0)


def test_dpo_train_raises_margin_and_keeps_reference(tiny):
    from qwen_edu.dpo import dpo_train, make_dpo_optimizer
    from qwen_edu.reward import make_preference_pairs
    tok, model = tiny
    ref, pol = copy.deepcopy(model), copy.deepcopy(model)
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    pairs = make_preference_pairs(None, tok, make_examples_('arith', 12))
    hist = dpo_train(pol, tok, pairs, ref_model=ref, steps=8, batch_size=8, lr=3e-3, eval_pairs=pairs, eval_every=4)
    assert hist[0]['margin'] == pytest.approx(0.0, abs=1e-6) and hist[-1]['margin'] > 0.01
    assert hist[-1]['accuracy'] > 0.5
    assert hist[0]['accuracy'] == 0.5 and hist[0]['accuracy_ci95'] == [0.5, 0.5]  # all ties at the start: no spread
    lo, hi = hist[-1]['accuracy_ci95']  # a bootstrap over the 12 pairs brackets the accuracy
    assert 0 <= lo <= hist[-1]['accuracy'] <= hi <= 1 and hi - lo > 0
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_sd.items())
    with pytest.raises(ValueError, match='needs base_model'): make_dpo_optimizer(pol, 'ondare')
    opt = make_dpo_optimizer(pol, 'onties', base_model=ref)
    assert isinstance(opt, OnlineMergingAdamW)
    with pytest.raises(ValueError, match='ref_model'): dpo_train(pol, tok, pairs, steps=1)


def test_run_dpo_entry_point(tiny, tmp_path):
    from qwen_edu.dpo import run_dpo
    tok, model = tiny
    m = copy.deepcopy(model)
    metrics = run_dpo(m, tok, out_dir=tmp_path, steps=2, n_train=6, n_eval=4, k=2, batch_size=4,
                      base_model=copy.deepcopy(model), optimizer='ondare')
    for k in ('heldout_margin_before', 'heldout_margin_after', 'heldout_pref_accuracy_after', 'heldout_task_accuracy_after'):
        assert k in metrics
    assert (tmp_path / 'dpo_model.safetensors').exists() and (tmp_path / 'dpo_metrics.json').exists()


def test_own_mistake_pair_rules():
    "Rejected: the greedy answer when it fails, else the first failing sample; chosen: a passing sample, else the solution."
    from qwen_edu.dpo import own_mistake_pair
    from qwen_edu.tasks import make_examples, score
    ex = make_examples('word', 1, seed=3, split='train')[0]
    ok, w1, w2 = ex.solution, ex.solution + '0', ex.solution + '1'  # 'Answer: 70': a different number
    assert score(ex, ok) == 1.0 and score(ex, w1) == score(ex, w2) == 0.0
    assert own_mistake_pair(ex, ok, [ok, ok, ok]) is None  # nothing to correct
    assert own_mistake_pair(ex, ok, []) is None
    p = own_mistake_pair(ex, ok, [ok + ' ', w1, w2])  # a sampled mistake; the passing sample is chosen
    assert (p.chosen, p.rejected) == (ok + ' ', w1)
    p = own_mistake_pair(ex, w2, [w1, ok])  # the greedy mistake comes first
    assert (p.chosen, p.rejected) == (ok, w2)
    p = own_mistake_pair(ex, w2, [w1])  # no passing sample: the reference solution
    assert (p.chosen, p.rejected) == (ex.solution, w2)
    p = own_mistake_pair(ex, w2, [w1, ok], usable=lambda r: r != w2)  # an unusable greedy answer is skipped
    assert p.rejected == w1
    assert own_mistake_pair(ex, w2, [ok], usable=lambda r: r == ok) is None


def test_own_mistake_pairs_reject_the_models_own_answers(tiny):
    "On a real (untrained) model every pair's rejected side is a response the model gave; greedy mistakes come first."
    from qwen_edu.dpo import own_mistake_pairs
    from qwen_edu.sft import generate_responses
    from qwen_edu.tasks import score
    tok, model = tiny
    exs = make_examples_('arith', 6)
    pairs = own_mistake_pairs(model, tok, exs, k=2, max_new_tokens=8, seed=0)
    greedy = {e.prompt: r[0] for e, r in zip(exs, generate_responses(model, tok, exs, 1, 0.0, 8, 0))}
    samples = {e.prompt: r for e, r in zip(exs, generate_responses(model, tok, exs, 2, 1.0, 8, 0))}
    assert pairs and len(pairs) <= len(exs)
    for p in pairs:
        g = greedy[p.example.prompt]
        assert score(p.example, p.rejected) == 0.0 and score(p.example, p.chosen) == 1.0
        assert p.rejected == g if score(p.example, g) == 0.0 else p.rejected in samples[p.example.prompt]


def test_run_dpo_pair_kinds(tiny):
    from qwen_edu.dpo import run_dpo
    tok, model = tiny
    m = run_dpo(copy.deepcopy(model), tok, steps=1, n_train=6, n_eval=4, k=2, batch_size=4)
    assert m['pairs'] == 'own' and 0 < m['train_pairs'] <= m['train_prompts'] == 6
    m = run_dpo(copy.deepcopy(model), tok, steps=1, n_train=6, n_eval=4, k=2, batch_size=4, pairs='sampled')
    assert m['pairs'] == 'sampled' and m['train_pairs'] == 6  # a pair per prompt (corrupted answers as fallbacks)
    with pytest.raises(ValueError, match=r"pairs='mine': choose from \('own', 'sampled'\)"):
        run_dpo(copy.deepcopy(model), tok, steps=1, pairs='mine')


def test_reference_logps_share_the_policys_precision(tiny, monkeypatch):
    "Under bf16 autocast the frozen reference is scored in bf16 too: at the first step policy == reference, loss = log 2."
    import qwen_edu.dpo as D
    from qwen_edu.reward import make_preference_pairs
    tok, model = tiny
    seen, real = [], D.dpo_loss
    monkeypatch.setattr(D, 'dpo_loss', lambda *a, **k: seen.append([t.detach().clone() for t in a[:4]]) or real(*a, **k))
    pairs = make_preference_pairs(None, tok, make_examples_('arith', 12))
    D.dpo_train(copy.deepcopy(model), tok, pairs, ref_model=copy.deepcopy(model), steps=1, batch_size=8, lr=1e-3,
                dtype='bf16')
    pc, pr, rc, rr = seen[0]
    assert (pc - rc).abs().max() < 1e-4 and (pr - rr).abs().max() < 1e-4  # fp32 reference: about 1e-3 apart
