"MoE: logits/aux-loss parity with transformers' Qwen2MoeForCausalLM, HF round trips, fast dispatch == loop, errors."
import json, warnings
import pytest, torch
import transformers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, AutoModelForCausalLM
from safetensors import safe_open
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.hf import from_hf, to_hf, config_to_hf, moe_state_dict_from_hf, moe_state_dict_to_hf
from qwen_edu.moe import (QwenSparseMoeBlock, QwenExperts, route, dispatch_loop, dispatch_grouped, dispatch_padded,
                          load_balancing_loss, router_z_loss, enable_bias_balancing, update_expert_bias, expert_load,
                          moe_blocks, MOE_PRESETS, count_per_expert, expert_dtype, grouped_mm_available)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings('ignore')

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e4, tie_word_embeddings=False,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
CASES = {  # with/without norm_topk_prob, decoder_sparse_step, mlp_only_layers, top-k 1/2/4/8, tied head
    'top2': {},
    'top4_norm': dict(num_experts_per_tok=4, norm_topk_prob=True),
    'sparse_step2_norm': dict(decoder_sparse_step=2, norm_topk_prob=True),
    'mlp_only_top1': dict(mlp_only_layers=[0, 2], num_experts_per_tok=1),
    'top8_all_tied': dict(num_experts_per_tok=8, tie_word_embeddings=True),
}
X = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
MASK = torch.ones(2, 20, dtype=torch.long); MASK[1, :6] = 0  # left padding on row 1


def tiny_hf(seed=0, **kw):
    "A random-weight transformers Qwen2MoeForCausalLM built from our config's HF dict."
    cfg = QwenConfig(**{**BASE, **kw})
    torch.manual_seed(seed)
    m = Qwen2MoeForCausalLM(Qwen2MoeConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():  # make biases/norms non-trivial and the router decisive
        for n, p in m.named_parameters():
            if n.endswith('bias') or 'norm' in n: p.add_(torch.randn_like(p) * 0.1)
            if n.endswith('mlp.gate.weight'): p.mul_(20)
    return cfg, m


@pytest.mark.parametrize('case', list(CASES))
def test_logits_and_aux_loss_match_transformers(case):
    cfg, hf = tiny_hf(**CASES[case])
    ours = from_hf(hf)
    assert ours.config == cfg
    for mask in (None, MASK):
        labels = X.clone()
        if mask is not None: labels[1, :7] = -100  # pad positions' logits (predicting tokens 1..6) are arbitrary
        with torch.no_grad():
            ref = hf(X, attention_mask=mask, labels=labels, output_router_logits=True)
            out = ours(X, attention_mask=mask, labels=labels)
        if mask is None: torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        else: torch.testing.assert_close(out.logits[MASK.bool()], ref.logits[MASK.bool()], atol=1e-5, rtol=0)
        assert len(out.router_logits) == len(ref.router_logits) == sum(cfg.is_moe_layer(i) for i in range(4))
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_sparse_layer_selection_matches_transformers():
    for kw in ({}, dict(decoder_sparse_step=2), dict(mlp_only_layers=[1, 3]), dict(decoder_sparse_step=3, mlp_only_layers=[2])):
        cfg, hf = tiny_hf(**kw)
        ours = QwenForCausalLM(cfg)
        got = [type(l.mlp).__name__ == 'QwenSparseMoeBlock' for l in ours.model.layers]
        want = [type(l.mlp).__name__ == 'Qwen2MoeSparseMoeBlock' for l in hf.model.layers]
        assert got == want


def test_state_dict_matches_transformers_in_memory_names():
    cfg, hf = tiny_hf()
    ours = QwenForCausalLM(cfg)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


def test_to_hf_round_trip_and_from_pretrained(tmp_path):
    cfg, hf = tiny_hf(seed=3, decoder_sparse_step=2)
    ours = from_hf(hf)
    to_hf(ours, tmp_path)
    with safe_open(str(tmp_path / 'model.safetensors'), 'pt') as f: keys = set(f.keys())
    assert 'model.layers.1.mlp.experts.7.gate_proj.weight' in keys and 'model.layers.1.mlp.gate.weight' in keys
    assert 'model.layers.1.mlp.shared_expert_gate.weight' in keys
    assert not any(k.endswith('gate_up_proj') for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == 'Qwen2MoeForCausalLM'
    back = from_hf(tmp_path)
    with torch.no_grad():
        ref = hf(X).logits
        torch.testing.assert_close(loaded(X).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(X).logits, ref, atol=1e-5, rtol=0)
    for k, v in ours.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    load = expert_load(back)  # the counters of a model loaded onto the meta device work too
    assert load.shape == (2, 8) and torch.allclose(load.sum(-1), torch.ones(2))


def test_from_hf_reads_save_pretrained_folder(tmp_path):
    cfg, hf = tiny_hf(seed=4, mlp_only_layers=[3])
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    with torch.no_grad(): torch.testing.assert_close(ours(X).logits, hf(X).logits, atol=1e-5, rtol=0)


def test_sharded_to_hf_round_trip(tmp_path):
    cfg, hf = tiny_hf(seed=5)
    to_hf(from_hf(hf), tmp_path, max_shard_size='100KB')
    assert (tmp_path / 'model.safetensors.index.json').exists()
    with torch.no_grad(): torch.testing.assert_close(from_hf(tmp_path)(X).logits, hf(X).logits, atol=1e-5, rtol=0)


def test_state_dict_mapping_inverse_and_missing_expert():
    cfg = QwenConfig(**BASE)
    sd = QwenForCausalLM(cfg).state_dict()
    hf_sd = moe_state_dict_to_hf(sd)
    assert sum('.mlp.experts.' in k for k in hf_sd) == 4 * 8 * 3
    back = moe_state_dict_from_hf(hf_sd)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    del hf_sd['model.layers.2.mlp.experts.5.up_proj.weight']
    with pytest.raises(ValueError, match='experts.5.up_proj'): moe_state_dict_from_hf(hf_sd)


def _grads(fn, x, w, e, ex, cap, gout):
    for p in (x, w, ex.gate_up_proj, ex.down_proj): p.grad = None
    out = fn(x, w, e, ex, cap)
    out.backward(gout)
    return [out.detach()] + [p.grad.clone() for p in (x, w, ex.gate_up_proj, ex.down_proj)]


@pytest.mark.parametrize('fast', [dispatch_grouped, dispatch_padded])
@pytest.mark.parametrize('k,cap', [(1, None), (2, None), (4, None), (2, 3), (4, 7)])
def test_fast_dispatch_equals_loop_outputs_and_grads(fast, k, cap):
    g = torch.Generator().manual_seed(k)
    ex = QwenExperts(16, 24, 12)
    x = torch.randn(50, 24, generator=g, requires_grad=True)
    w, e = route(torch.randn(50, 16, generator=g) * 3, k)
    w = w.detach().requires_grad_()
    gout = torch.randn(50, 24, generator=g)
    a = _grads(dispatch_loop, x, w, e, ex, cap, gout)
    b = _grads(fast, x, w, e, ex, cap, gout)
    for t1, t2 in zip(a, b): torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)
    if cap is not None:  # dropping really happened and changed the output
        full = fast(x, w, e, ex)
        assert not torch.allclose(full, a[0])


def test_grouped_path_really_uses_grouped_mm(monkeypatch):
    "On this CPU torch has grouped_mm, and the default dispatch calls it (not the padded fallback)."
    import torch.nn.functional as F
    import qwen_edu.moe as moe
    if not hasattr(F, 'grouped_mm'): pytest.skip('this torch has no grouped_mm; dispatch_grouped falls back to bmm')
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, 'grouped_mm', lambda *a, **k: calls.append(1) or real(*a, **k))
    ex = QwenExperts(4, 8, 12)
    w, e = route(torch.randn(10, 4), 2)
    moe.dispatch_grouped(torch.randn(10, 8), w, e, ex)
    assert len(calls) == 2
    calls.clear()
    moe.dispatch_grouped(torch.randn(10, 8), w, e, QwenExperts(4, 8, 6))  # 6 floats = 24 bytes: padded fallback
    assert not calls


def test_block_default_is_grouped_and_matches_loop_end_to_end():
    cfg = QwenConfig(**BASE)
    torch.manual_seed(0)
    m = QwenForCausalLM(cfg)
    assert all(b.dispatch == 'grouped' for b in moe_blocks(m))
    out = m(X, labels=X)
    out.loss.backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    for b in moe_blocks(m): b.dispatch = 'loop'
    out2 = m(X, labels=X)
    out2.loss.backward()
    torch.testing.assert_close(out.logits, out2.logits, atol=1e-5, rtol=0)
    for n, p in m.named_parameters(): torch.testing.assert_close(p.grad, g1[n], atol=1e-5, rtol=1e-4)


def test_capacity_factor_drops_tokens():
    cfg = QwenConfig(**BASE)
    torch.manual_seed(0)
    m = QwenForCausalLM(cfg).eval()
    with torch.no_grad():
        ref = m(X).logits
        for b in moe_blocks(m): b.capacity_factor = 0.25
        dropped = m(X).logits
        for b in moe_blocks(m): b.dispatch = 'loop'
        dropped_loop = m(X).logits
    assert not torch.allclose(ref, dropped)
    torch.testing.assert_close(dropped, dropped_loop, atol=1e-5, rtol=0)


def test_bad_configs_give_clear_errors():
    with pytest.raises(ValueError, match='num_experts_per_tok'): QwenConfig(**{**BASE, 'num_experts_per_tok': 9})
    cfg = QwenConfig(**BASE); cfg.num_experts = 0
    with pytest.raises(ValueError, match='num_experts > 0'): QwenSparseMoeBlock(cfg)
    cfg = QwenConfig(**BASE); cfg.num_experts_per_tok = 9
    with pytest.raises(ValueError, match=r'1\.\.num_experts'): QwenSparseMoeBlock(cfg)
    cfg = QwenConfig(**BASE); cfg.moe_intermediate_size = 0
    with pytest.raises(ValueError, match='moe_intermediate_size'): QwenSparseMoeBlock(cfg)
    with pytest.raises(ValueError, match='at least one'): load_balancing_loss((), 8, 2)
    m = QwenForCausalLM(QwenConfig(**BASE))
    with pytest.raises(ValueError, match='enable_bias_balancing'): update_expert_bias(m)


def test_zero_experts_with_moe_fields_is_an_error():
    "Needs the config patch in .scratch/moe_patches.md (config.validate); skipped until it is applied."
    try: QwenConfig(**{**BASE, 'num_experts': 0})
    except ValueError as e:
        assert 'num_experts' in str(e); return
    pytest.skip("config.py does not yet reject num_experts=0 with num_experts_per_tok/moe_intermediate_size set "
                "(patch proposed in .scratch/moe_patches.md)")


def test_aux_loss_values_and_z_loss():
    E = 8
    torch.testing.assert_close(load_balancing_loss(torch.zeros(12, E), E, 2), torch.tensor(2.))
    lg = torch.randn(12, E); lg[:, 0] += 4
    assert load_balancing_loss(lg, E, 2) > 2.5
    torch.testing.assert_close(router_z_loss((lg, lg)), torch.logsumexp(lg, -1).pow(2).mean())


def test_bias_balancing_changes_choice_not_weights_and_flattens_load():
    lg = torch.tensor([[3., 2., 1., 0.]])
    w0, e0 = route(lg, 1)
    w1, e1 = route(lg, 1, bias=torch.tensor([-5., 0., 0., 0.]))
    assert e0.item() == 0 and e1.item() == 1
    torch.testing.assert_close(w1, lg.softmax(-1)[:, 1:2])
    cfg = QwenConfig(**BASE)
    torch.manual_seed(0)
    m = enable_bias_balancing(QwenForCausalLM(cfg))
    with torch.no_grad():
        for b in moe_blocks(m): b.gate.weight[0] += 0.5  # make expert 0 popular
        x = torch.randint(0, 256, (8, 32))
        m(x); before = expert_load(m)[:, 0].mean()
        for _ in range(30): m(x); update_expert_bias(m, 0.04)
        m(x); after = expert_load(m)[:, 0].mean()
    assert after < before
    assert all(b.expert_bias.abs().sum() > 0 for b in moe_blocks(m))
    assert 'model.layers.0.mlp.expert_bias' in m.state_dict()
    with pytest.raises(ValueError, match='routing bias'): moe_state_dict_to_hf(m.state_dict())


def test_presets_as_released_and_meta_counts():
    c = QwenConfig.from_preset('qwen1.5-moe-a2.7b')
    assert (c.hidden_size, c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.shared_expert_intermediate_size, c.norm_topk_prob, c.tie_word_embeddings) == (2048, 24, 60, 4, 1408, 5632, False, False)
    assert round(c.num_params() / 1e9, 1) == 14.3 and round(c.num_active_params() / 1e9, 1) == 2.7
    q = QwenConfig.from_preset('qwen2-57b-a14b')
    assert (q.hidden_size, q.num_key_value_heads, q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size,
            q.shared_expert_intermediate_size) == (3584, 4, 64, 8, 2560, 20480)
    assert round(q.num_params() / 1e9, 1) == 57.4 and round(q.num_active_params() / 1e9) == 14
    for name in MOE_PRESETS:
        cfg = QwenConfig.from_preset(name)
        with torch.device('meta'): m = QwenForCausalLM(cfg)
        assert sum(p.numel() for p in m.parameters()) == cfg.num_params(), name
        # transformers builds the same parameter count for the released configs
        if name != 'edu-moe-tiny':
            with torch.device('meta'): h = Qwen2MoeForCausalLM(Qwen2MoeConfig(**config_to_hf(cfg)))
            assert sum(p.numel() for p in h.parameters()) == cfg.num_params(), name
    tiny, dense = QwenConfig.from_preset('edu-moe-tiny'), QwenConfig.from_preset('edu-tiny')
    assert abs(tiny.num_active_params() / dense.num_active_params() - 1) < 0.01
    assert tiny.num_params() > 1.5 * dense.num_params()


def test_aux_loss_with_an_all_zero_mask_is_zero():
    "An all-padding batch has no token to balance: 0 (and a zero gradient), not 0/0."
    lg = torch.randn(2 * 5, 8, requires_grad=True)
    out = load_balancing_loss((lg, lg), 8, 2, torch.zeros(2, 5, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(lg.grad, torch.zeros_like(lg))
    m = torch.ones(2, 5); m[1] = 0  # a partly padded batch still equals the loss over its real rows
    torch.testing.assert_close(load_balancing_loss(lg, 8, 2, m), load_balancing_loss(lg[:5], 8, 2))


def test_packed_rows_with_document_ids_equal_separate_runs():
    "The MoE model shares the attention: with document_ids every packed sequence gets the logits of its own run."
    _, hf = tiny_hf()
    ours = from_hf(hf)
    lens, ids = [6, 9, 5], X[:1]
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, document_ids=docs).logits
        at = 0
        for n in lens:
            torch.testing.assert_close(packed[:, at:at + n], ours(ids[:, at:at + n]).logits, atol=1e-5, rtol=0); at += n
        torch.testing.assert_close(packed, hf(ids, position_ids=pos, use_cache=False).logits, atol=1e-5, rtol=0)


def test_count_per_expert_equals_bincount():
    e = torch.randint(0, 7, (50, 3))
    assert torch.equal(count_per_expert(e.reshape(-1), 9), torch.bincount(e.reshape(-1), minlength=9))


def test_bf16_autocast_takes_grouped_path_in_bf16(monkeypatch):
    "Under autocast the residual stream stays fp32; the experts are cast to the autocast dtype and grouped_mm runs in bf16."
    import torch.nn.functional as F
    if not hasattr(F, 'grouped_mm'): pytest.skip('this torch has no grouped_mm')
    ex = QwenExperts(4, 16, 8)
    x = torch.randn(12, 16)
    w, e = route(torch.randn(12, 4), 2)
    assert expert_dtype(x) == torch.float32
    seen, real = [], F.grouped_mm
    monkeypatch.setattr(F, 'grouped_mm', lambda a, b, **k: seen.append((a.dtype, b.dtype)) or real(a, b, **k))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert expert_dtype(x) == torch.bfloat16 and grouped_mm_available(x, ex)
        out = dispatch_grouped(x, w, e, ex)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dispatch_loop(x, w, e, ex), atol=2e-2, rtol=2e-2)
    # an expert width of 6 is 12 bytes in bf16, not a multiple of 16: the padded fallback
    seen.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16): dispatch_grouped(x, w, e, QwenExperts(4, 16, 6))
    assert not seen


def test_bf16_autocast_model_step_uses_grouped():
    "A whole MoE model under bf16 autocast: loss close to fp32, finite grads, and the experts ran in bf16."
    cfg = QwenConfig(**{**BASE, 'moe_intermediate_size': 32})
    torch.manual_seed(0)
    m = QwenForCausalLM(cfg)
    ref = m(X, labels=X).loss
    with torch.autocast('cpu', dtype=torch.bfloat16): loss = m(X, labels=X, return_logits=False).loss
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_bf16_grouped_equals_padded():
    "On CUDA under bf16 autocast, the grouped path is taken and agrees with the padded bmm path (bf16 tolerance)."
    torch.manual_seed(0)
    ex = QwenExperts(8, 64, 32).cuda()
    x = torch.randn(256, 64, device='cuda', requires_grad=True)
    w, e = route(torch.randn(256, 8, device='cuda'), 2)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert grouped_mm_available(x, ex)
        a, b = dispatch_grouped(x, w, e, ex), dispatch_padded(x, w, e, ex)
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    ga = torch.autograd.grad(a.float().sum(), (x, ex.gate_up_proj))
    gb = torch.autograd.grad(b.float().sum(), (x, ex.gate_up_proj))
    for p, q in zip(ga, gb): torch.testing.assert_close(p, q, atol=5e-2, rtol=5e-2)
    assert not grouped_mm_available(x, ex)  # fp32 outside autocast: grouped_mm wants bf16 on CUDA, so padded


def test_fast_dispatch_module_is_a_lower_layer_and_moe_keeps_its_names():
    "qwen_edu.moe_dispatch (appendix A7) imports no qwen_edu module; qwen_edu.moe imports it and keeps the moved names."
    import ast, pathlib
    import qwen_edu.moe as moe, qwen_edu.moe_dispatch as md
    tree = ast.parse(pathlib.Path(md.__file__).read_text())
    ours = {n.module or '.' for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.level or (n.module or '').startswith('qwen_edu'))}
    ours |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith('qwen_edu')}
    assert not ours, f"qwen_edu.moe_dispatch must stay below qwen_edu.moe, but imports {ours}"
    for name in ('count_per_expert', 'expert_slots', 'dispatch_padded', 'expert_dtype', 'grouped_mm_available',
                 'dispatch_grouped'):
        assert getattr(moe, name) is getattr(md, name), name
    assert moe.DISPATCH == {'grouped': md.dispatch_grouped, 'padded': md.dispatch_padded, 'loop': moe.dispatch_loop}


def test_aux_loss_barely_pushes_a_dead_expert_back():
    "On a collapsed router the aux loss's gradient on an expert's logit scales with its probability (chapter 08's study)."
    E = 8
    logits = torch.zeros(64, E); logits[:, 0] = 4.; logits[:, 7] = -6.  # expert 0 takes every token, 7 is dead
    logits.requires_grad_()
    load_balancing_loss(logits, E, 1).backward()
    g = logits.grad.sum(0)
    assert g[0] > 0 and (g[1:] < 0).all()       # descent lowers the overloaded expert, raises the others...
    assert -g[7] < 1e-2 * -g[1]                 # ...but the dead one ~p_7/p_1 as much as a merely unused one
    assert -g[7] < 1e-3 * g[0]
