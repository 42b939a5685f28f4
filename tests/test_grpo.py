"""GRPO: group advantages, the clipped k3-KL loss in its three aggregations and the variance ordering equal the
published formulas computed independently with explicit loops; gradients reach only the policy; bad input fails."""
import math
import pytest
import torch
from qwen_edu.grpo import LOSS_TYPES, group_advantages, grpo_loss, order_by_reward_variance, reward_variance


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def loop_advantages(rewards, G, eps=1e-4):
    out = []
    for q in range(len(rewards) // G):
        grp = rewards[q * G:(q + 1) * G]
        m = sum(grp) / G
        sd = math.sqrt(sum((r - m) ** 2 for r in grp) / (G - 1))
        out += [(r - m) / (sd + eps) for r in grp]
    return out


def loop_loss(lp, old, ref, adv, mask, eps, beta, loss_type, max_len):
    B, T = len(lp), len(lp[0])
    seq_means, total, n_all = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[b][t]: continue
            rho = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            term = -min(rho * adv[b], clipped * adv[b])
            term += beta * (math.exp(ref[b][t] - lp[b][t]) - (ref[b][t] - lp[b][t]) - 1)
            s += term; n += 1
        seq_means.append(s / n if n else 0.0); total += s; n_all += n
    return {'grpo': sum(seq_means) / B, 'bnpo': total / n_all, 'dr_grpo': total / (B * max_len)}[loss_type]


@pytest.mark.parametrize('G', [2, 4, 8])
def test_group_advantages_match_formula(G):
    g = torch.Generator().manual_seed(G)
    r = torch.rand(5 * G, generator=g).round(decimals=1)
    r[:G] = 1.0  # a group with zero variance gets zero advantages
    ours = group_advantages(r, G)
    assert torch.allclose(ours, torch.tensor(loop_advantages(r.tolist(), G)), atol=1e-5)
    assert torch.all(ours[:G] == 0)
    assert torch.allclose(ours.view(-1, G).sum(1), torch.zeros(5), atol=1e-4)


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
@pytest.mark.parametrize('beta,eps', [(0.04, 0.2), (0.0, 0.2), (0.5, 0.1)])
def test_grpo_loss_matches_loops(loss_type, beta, eps):
    g = torch.Generator().manual_seed(1)
    B, T = 8, 9
    lp = torch.randn(B, T, generator=g) * 0.7 - 1.5
    old = lp + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [1-eps, 1+eps] on both sides
    ref = lp + 0.4 * torch.randn(B, T, generator=g)
    adv = group_advantages(torch.rand(B, generator=g), 4)
    lengths = torch.tensor([9, 1, 4, 7, 2, 9, 5, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    max_len = 12
    ours = grpo_loss(lp, old, ref, adv, mask, epsilon=eps, beta=beta, loss_type=loss_type, max_completion_length=max_len)
    ref_val = loop_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps, beta, loss_type, max_len)
    assert abs(ours.item() - ref_val) < 1e-5


def test_dr_grpo_defaults_to_the_padded_length():
    lp = torch.randn(3, 5); mask = torch.ones(3, 5); mask[0, 3:] = 0
    adv = torch.randn(3)
    a = grpo_loss(lp, lp, lp, adv, mask, loss_type='dr_grpo')
    b = grpo_loss(lp, lp, lp, adv, mask, loss_type='dr_grpo', max_completion_length=5)
    c = grpo_loss(lp, lp, lp, adv, mask, loss_type='dr_grpo', max_completion_length=10)
    assert torch.allclose(a, b) and torch.allclose(c, a / 2)
    assert torch.allclose(a * 15, -(adv[:, None] * mask).sum())


def test_ratio_one_and_zero_kl_gives_minus_advantage_per_token():
    lp = torch.randn(4, 6)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    mask = torch.ones(4, 6)
    assert abs(grpo_loss(lp, lp, lp, adv, mask, loss_type='bnpo').item() - (-adv.mean().item())) < 1e-6


def test_gradients_reach_only_the_policy():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 6, generator=g, requires_grad=True)
    old = (lp.detach() + 0.1).requires_grad_()
    ref = (lp.detach() - 0.1).requires_grad_()
    adv = torch.randn(4, generator=g, requires_grad=True)
    mask = torch.ones(4, 6); mask[1, 4:] = 0
    grpo_loss(lp, old, ref, adv, mask).backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert torch.all(lp.grad[1, 4:] == 0)  # padding gets no gradient


def test_kl_term_is_k3_and_nonnegative():
    lp = torch.randn(2, 5)
    ref = lp + torch.randn(2, 5)
    zero_adv = torch.zeros(2)
    loss = grpo_loss(lp, lp, ref, zero_adv, torch.ones(2, 5), beta=1.0, loss_type='bnpo')
    d = ref - lp
    assert loss.item() >= 0 and abs(loss.item() - (torch.exp(d) - d - 1).mean().item()) < 1e-6


def test_order_by_reward_variance():
    r = torch.tensor([1., 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1])
    assert torch.allclose(reward_variance(r, 4), torch.tensor([0.0, 1 / 3, 0.25]))
    assert order_by_reward_variance(['q0', 'q1', 'q2'], r, 4) == ['q1', 'q2', 'q0']
    with pytest.raises(ValueError, match='2 queries but 3 groups'): order_by_reward_variance(['a', 'b'], r, 4)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match='do not split into groups of 8'): group_advantages(torch.ones(12), 8)
    with pytest.raises(ValueError, match='group_size must be >= 2'): group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match='must be 1-D'): group_advantages(torch.ones(2, 4), 4)
    with pytest.raises(ValueError, match='do not split'): reward_variance(torch.ones(5), 4)
    lp, mask, adv = torch.randn(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match='all zeros'): grpo_loss(lp, lp, lp, adv, torch.zeros(2, 3))
    with pytest.raises(ValueError, match='must match'): grpo_loss(lp, lp[:, :2], lp, adv, mask)
    with pytest.raises(ValueError, match='must match'): grpo_loss(lp, lp, lp, adv, mask[:1])
    with pytest.raises(ValueError, match=r'advantages must be \(batch,\)'): grpo_loss(lp, lp, lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match='loss_type must be one of'): grpo_loss(lp, lp, lp, adv, mask, loss_type='ppo')
    with pytest.raises(ValueError, match='needs ref_logps'): grpo_loss(lp, lp, None, adv, mask)


# ---- with a model ---------------------------------------------------------------------------------------------
import copy


@pytest.fixture(scope='module')
def tok():
    from qwen_edu.sft import train_task_tokenizer
    return train_task_tokenizer(vocab_size=300, n=60)


def test_completion_token_logps_and_a_grpo_step(tok):
    from qwen_edu.grpo import completion_token_logps, grpo_train
    from qwen_edu.sft import toy_model
    from qwen_edu.tasks import make_examples
    torch.manual_seed(0)
    model = toy_model(tok, hidden_size=32).eval()
    prompts = [[5, 6, 7], [8, 9]]
    comps = [[10, 11], [12, 13, 14]]
    with torch.no_grad(): lp, mask = completion_token_logps(model, prompts, comps)
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]  # position t scores token t+1
    with torch.no_grad(): full = torch.log_softmax(model(torch.tensor([[8, 9, 12, 13, 14]])).logits[0], -1)
    assert torch.allclose(lp[1, 1:], torch.stack([full[1, 12], full[2, 13], full[3, 14]]), atol=1e-5)
    ref, pol = copy.deepcopy(model), copy.deepcopy(model)
    ref_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    qs = make_examples('arith', 6, seed=0)
    # a random model never passes the checker: zero advantages and (policy == reference) zero KL gradient
    same = copy.deepcopy(model)
    grpo_train(same, ref, tok, qs, steps=1, group_size=4, queries_per_step=2, max_new_tokens=5)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in ref_sd.items())
    varied = lambda ex, response: float(len(response) % 2)  # a reward that varies within groups
    hist = grpo_train(pol, ref, tok, qs, steps=2, group_size=4, queries_per_step=2, max_new_tokens=5,
                      num_iterations=2, eval_examples=make_examples('arith', 2, seed=1), eval_every=2, reward_fn=varied)
    assert [h['step'] for h in hist] == [0, 1, 2] and 'heldout_accuracy' in hist[0] and 'reward' in hist[0]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_sd.items())
    assert any(not torch.equal(p, ref_sd[n]) for n, p in pol.state_dict().items())
    with pytest.raises(ValueError, match='at least one query'): grpo_train(pol, ref, tok, [], steps=1)
    with pytest.raises(ValueError, match='no trainable parameters'):  # a copy of the reference grpo_train froze
        grpo_train(copy.deepcopy(ref), ref, tok, qs, steps=1)


def test_run_grpo_and_pipeline_registration(tok, tmp_path, monkeypatch):
    import sys, types
    import qwen_edu.grpo as G
    from qwen_edu.sft import toy_model
    m = toy_model(tok, hidden_size=32)
    metrics = G.run_grpo(m, tok, out_dir=tmp_path, steps=1, n_train=4, n_eval=2, group_size=2, queries_per_step=2,
                         max_new_tokens=4)
    assert {'heldout_accuracy_before', 'heldout_accuracy_after'} <= set(metrics)
    assert (tmp_path / 'grpo_model.safetensors').exists() and not list(tmp_path.glob('*.pt'))


def test_post_training_steps_scale_with_pretraining():
    import types
    from qwen_edu.pipeline import post_training_steps, PipelineConfig, POST_TRAINING_STEPS
    full = PipelineConfig().max_steps  # the default run uses the listed steps; shorter runs scale them down
    assert post_training_steps(types.SimpleNamespace(max_steps=full), 'sft') == POST_TRAINING_STEPS['sft']
    assert post_training_steps(types.SimpleNamespace(max_steps=2 * full), 'sft') == POST_TRAINING_STEPS['sft']
    assert post_training_steps(types.SimpleNamespace(max_steps=full // 4), 'sft') == round(POST_TRAINING_STEPS['sft'] / 4)
    assert post_training_steps(types.SimpleNamespace(max_steps=1), 'grpo') == 2
    assert post_training_steps(types.SimpleNamespace(max_steps=6, post_training_steps={'dpo': 7}), 'dpo') == 7


def test_log_probs_use_the_sampling_temperature(tok, monkeypatch):
    "Sampling at T draws from softmax(logits / T): the old-policy, policy and reference log-probs must be of that."
    import qwen_edu.grpo as G
    from qwen_edu.sft import toy_model
    from qwen_edu.tasks import make_examples
    torch.manual_seed(0)
    model, T = toy_model(tok, hidden_size=32).eval(), 0.6
    prompts, comps = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    with torch.no_grad():
        lp, _ = G.completion_token_logps(model, prompts, comps, temperature=T)
        full = torch.log_softmax(model(torch.tensor([[8, 9, 12, 13, 14]])).logits[0] / T, -1)
    assert torch.allclose(lp[1, 1:], torch.stack([full[1, 12], full[2, 13], full[3, 14]]), atol=1e-5)
    with pytest.raises(ValueError, match='temperature must be > 0'): G.completion_token_logps(model, prompts, comps, temperature=0)
    # inside grpo_train: the tokens it sampled at T, scored by the starting policy at T
    seen, real_sample, real_loss = {}, G.sample, G.grpo_loss
    def spy_sample(m, p, n, temperature, *a):
        out = real_sample(m, p, n, temperature, *a)
        seen.update(P=p, C=out, T=temperature); return out
    def spy_loss(lp, old, ref, *a):
        seen.setdefault('loss_args', []).append((lp.detach(), old, ref, a[1])); return real_loss(lp, old, ref, *a)
    monkeypatch.setattr(G, 'sample', spy_sample); monkeypatch.setattr(G, 'grpo_loss', spy_loss)
    start, ref, pol = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    G.grpo_train(pol, ref, tok, make_examples('arith', 1, seed=0), steps=1, group_size=2, queries_per_step=1,
                 pool_factor=1, temperature=T, max_new_tokens=4, num_iterations=2, reward_fn=lambda e, r: float(len(r) % 2))
    assert seen['T'] == T
    lp0, old, ref_lp, mask = seen['loss_args'][0]
    for i, (p, c) in enumerate(zip(seen['P'], seen['C'])):
        ids = p + c
        with torch.no_grad(): logits = start(torch.tensor([ids])).logits[0]
        want = torch.stack([torch.log_softmax(logits[t - 1] / T, -1)[ids[t]] for t in range(len(p), len(ids))])
        at_one = torch.stack([torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(len(p), len(ids))])
        got = old[i][mask[i].bool()]
        for x in (got, ref_lp[i][mask[i].bool()], lp0[i][mask[i].bool()]):
            torch.testing.assert_close(x, want, atol=1e-5, rtol=0)
        assert not torch.allclose(got, at_one, atol=1e-3)
    with pytest.raises(ValueError, match='temperature must be > 0'):
        G.grpo_train(pol, ref, tok, make_examples('arith', 1, seed=0), steps=1, temperature=0.0)


def test_reference_and_old_logps_share_the_policys_precision(tok, monkeypatch):
    "Under bf16 autocast the reference and old-policy log-probs are bf16 too: at the first step ratio 1 and KL 0 exactly."
    import qwen_edu.grpo as G
    from qwen_edu.sft import toy_model
    from qwen_edu.tasks import make_examples
    torch.manual_seed(0)
    model = toy_model(tok, hidden_size=32).eval()
    seen, real = [], G.grpo_loss
    monkeypatch.setattr(G, 'grpo_loss', lambda *a, **k: seen.append([t.detach().clone() for t in a[:3]]) or real(*a, **k))
    G.grpo_train(copy.deepcopy(model), copy.deepcopy(model), tok, make_examples('arith', 6, seed=0), steps=1, group_size=4,
                 queries_per_step=2, max_new_tokens=5, num_iterations=2, dtype='bf16')
    lp, old, ref = seen[0]
    assert (lp - ref).abs().max() < 1e-4 and (lp - old).abs().max() < 1e-4  # fp32 ones: about 1e-3 apart


# ---- where the rewards come from ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def rm(tok):
    from qwen_edu.reward import RewardModel
    from qwen_edu.sft import toy_model
    torch.manual_seed(0)
    return RewardModel.from_causal_lm(toy_model(tok, hidden_size=32)).eval()


def test_reward_kinds(tok, rm):
    from qwen_edu.grpo import make_reward_fn, score_responses
    from qwen_edu.reward import reward_model_scores
    from qwen_edu.tasks import make_examples, score
    exs = make_examples(['arith', 'word'], 4, seed=0)
    resp = [exs[0].solution, 'Answer: nothing', exs[2].solution, 'no answer']
    checker = make_reward_fn('checker')
    assert checker is score  # today's behaviour, unchanged
    assert score_responses(checker, exs, resp) == [1.0, 0.0, 1.0, 0.0]
    s = reward_model_scores(rm, tok, exs, resp)
    assert score_responses(make_reward_fn('model', tok, rm), exs, resp) == pytest.approx(s, abs=1e-6)
    both = score_responses(make_reward_fn('both', tok, rm), exs, resp)
    assert both == pytest.approx([c + 0.5 / (1 + math.exp(-x)) for c, x in zip([1, 0, 1, 0], s)], abs=1e-6)
    assert min(both[0], both[2]) > 1.0 and max(both[1], both[3]) < 0.5  # a pass always beats a fail
    assert make_reward_fn('model', tok, rm)(exs[1], resp[1]) == pytest.approx(s[1], abs=1e-6)  # one pair at a time


def test_reward_kind_errors(tok, rm):
    from qwen_edu.grpo import make_reward_fn, run_grpo
    from qwen_edu.sft import toy_model
    with pytest.raises(ValueError, match='one of'): make_reward_fn('rm')
    for kind in ('model', 'both'):
        with pytest.raises(ValueError, match='needs reward_model='): make_reward_fn(kind, tok)
    with pytest.raises(ValueError, match='needs the tokenizer'): make_reward_fn('model', None, rm)
    with pytest.raises(ValueError, match='does not use reward_model'): make_reward_fn('checker', tok, rm)
    with pytest.raises(ValueError, match='weight must be'): make_reward_fn('both', tok, rm, weight=1.0)
    with pytest.raises(ValueError, match='needs reward_model='): run_grpo(toy_model(tok, hidden_size=32), tok, reward='both')


def test_run_grpo_with_the_reward_model_and_given_examples(tok, rm, monkeypatch):
    "reward='model' reaches grpo_train as the reward model's scores; queries/eval_examples replace the drawn sets."
    import qwen_edu.grpo as G
    from qwen_edu.sft import toy_model
    from qwen_edu.tasks import make_examples
    seen = {}
    real = G.grpo_train
    def spy(model, ref, tok_, queries, **kw):
        seen.update(queries=queries, eval=kw['eval_examples'], reward_fn=kw['reward_fn'])
        return real(model, ref, tok_, queries, **kw)
    monkeypatch.setattr(G, 'grpo_train', spy)
    qs, ev = make_examples('arith', 3, seed=5, split='train'), make_examples('arith', 2, seed=6, split='test')
    m = toy_model(tok, hidden_size=32)
    metrics = G.run_grpo(m, tok, steps=1, group_size=2, queries_per_step=1, max_new_tokens=4, reward='model',
                         reward_model=rm, queries=qs, eval_examples=ev)
    assert seen['queries'] == qs and seen['eval'] == ev and metrics['reward'] == 'model'
    assert isinstance(seen['reward_fn'], G.ModelReward) and seen['reward_fn'].kind == 'model'
    with pytest.raises(ValueError, match='also training queries'):
        G.run_grpo(m, tok, steps=1, queries=qs, eval_examples=qs[:1])
