"""Parity of qwen_edu.model.QwenForCausalLM with transformers' Qwen2ForCausalLM (random tiny models, no downloads),
KV-cache decoding, padding, loss, and bad-input errors."""
import math
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM, KVCache, default_position_ids


def hf_config(cfg: QwenConfig, attn='eager'):
    rp = dict(rope_type='default', rope_theta=cfg.rope_theta)
    if cfg.rope_scaling is not None:
        rp = {k: v for k, v in cfg.rope_scaling.items() if k != 'type'} | dict(rope_theta=cfg.rope_theta)
    return Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                       rope_parameters=rp, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                       attn_implementation=attn)


def twins(cfg, seed=0, attn='eager'):
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(hf_config(cfg, attn)).eval()
    # larger-than-default weights so that differences are not hidden by tiny activations
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith('bias'): p.normal_(0, 0.1)
            elif 'norm' in n: p.uniform_(0.5, 1.5)
            else: p.normal_(0, 0.08)
    ours = QwenForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


CONFIGS = {
    'tied_gqa2_theta1e4': dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True),
    'untied_mha_theta1e6': dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                num_attention_heads=3, num_key_value_heads=3, rope_theta=1e6, tie_word_embeddings=False),
    'gqa7_odd_sizes': dict(vocab_size=77, hidden_size=56, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=7, num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True),
    'yarn_untied': dict(vocab_size=90, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, rope_theta=1e4, tie_word_embeddings=False,
                        max_position_embeddings=256,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


def make(name):
    return QwenConfig(**{'max_position_embeddings': 128, **CONFIGS[name]})


@pytest.mark.parametrize('name', list(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    cfg = make(name)
    hf, ours = twins(cfg)
    assert list(ours.state_dict()) == list(hf.state_dict())
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, 29))
    labels = ids.clone(); labels[:, :4] = -100; labels[1, 10:] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), hf(ids, labels=labels)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
        ours.set_attn_implementation('eager')
        torch.testing.assert_close(ours(ids).logits, b.logits, atol=1e-5, rtol=0)


def test_long_positions_with_yarn_beyond_original_length():
    cfg = make('yarn_untied')
    hf, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 200))  # beyond original_max_position_embeddings=64
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', ['tied_gqa2_theta1e4', 'gqa7_odd_sizes'])
def test_left_padding_and_position_ids_match_transformers(name):
    cfg = make(name)
    hf, ours = twins(cfg)
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    am = torch.ones(3, 17, dtype=torch.long); am[0, :5] = 0; am[2, :1] = 0
    pos = default_position_ids(am, 17, 0, 'cpu')
    # labels only where the token and the one before it are real: the logits of padding positions are not
    # defined (transformers' eager and sdpa paths disagree there), so a real label must not be predicted from one
    labels = ids.masked_fill(am == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(am[:, :-1] == 0, -100)
    with torch.no_grad():
        a = ours(ids, attention_mask=am, position_ids=pos, labels=labels)
        b = hf(ids, attention_mask=am, position_ids=pos, labels=labels)
    real = am.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=0)
    assert torch.isfinite(a.logits).all()  # fully padded query rows stay finite
    # default positions (from the mask) equal the explicit ones
    with torch.no_grad(): torch.testing.assert_close(ours(ids, attention_mask=am).logits, a.logits)
    # a left-padded row equals the same sequence without padding
    with torch.no_grad(): torch.testing.assert_close(a.logits[0, 5:], ours(ids[:1, 5:]).logits[0], atol=1e-5, rtol=0)


def test_explicit_position_ids_offset_match_transformers():
    cfg = make('untied_mha_theta1e6')
    hf, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    pos = torch.arange(9)[None] + 40
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits, atol=1e-5, rtol=0)


def test_sdpa_transformers_parity():
    cfg = make('tied_gqa2_theta1e4')
    hf, ours = twins(cfg, attn='sdpa')
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad(): torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_gradients_match_transformers():
    cfg = make('tied_gqa2_theta1e4')
    hf, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    ours(ids, labels=ids).loss.backward(); hf(ids, labels=ids).loss.backward()
    g_hf = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g_hf[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize('name', ['tied_gqa2_theta1e4', 'gqa7_odd_sizes', 'yarn_untied'])
def test_incremental_decoding_equals_full_forward(name):
    cfg = make(name)
    _, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        parts = [out.logits]
        # a chunk of 3 (explicit causal mask with offset), then single tokens
        out = ours(ids[:, 6:9], past_key_values=out.past_key_values, use_cache=True); parts.append(out.logits)
        for t in range(9, 15):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True); parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert out.past_key_values.seq_len == 15


def test_cache_with_left_padding_matches_transformers_generate_style():
    cfg = make('tied_gqa2_theta1e4')
    hf, ours = twins(cfg)
    ids = torch.randint(1, cfg.vocab_size, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long); am[1, :4] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=am).logits
        cache = KVCache(max_len=12)
        out = ours(ids[:, :7], attention_mask=am[:, :7], past_key_values=cache, use_cache=True)
        parts = [out.logits]
        for t in range(7, 12):
            out = ours(ids[:, t:t + 1], attention_mask=am[:, :t + 1], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
        assert out.past_key_values is cache
        hf_full = hf(ids, attention_mask=am, position_ids=default_position_ids(am, 12, 0, 'cpu')).logits
    got = torch.cat(parts, 1)
    torch.testing.assert_close(got[am.bool()], full[am.bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[am.bool()], hf_full[am.bool()], atol=1e-5, rtol=0)


def test_cache_grows_and_selects():
    cfg = make('tied_gqa2_theta1e4')
    _, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    cache = KVCache(max_len=2)  # forces growth
    with torch.no_grad():
        full = ours(ids).logits
        ours(ids[:, :4], past_key_values=cache, use_cache=True)
        cache.select(torch.tensor([2, 0]))
        out = ours(ids[[2, 0], 4:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits, full[[2, 0], 4:], atol=1e-5, rtol=0)


def test_tied_head_shares_the_embedding():
    ours = QwenForCausalLM(make('tied_gqa2_theta1e4'))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert 'lm_head.weight' in ours.state_dict()
    untied = QwenForCausalLM(make('untied_mha_theta1e6'))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_init_like_transformers():
    cfg = QwenConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    torch.manual_seed(0)
    m = QwenForCausalLM(cfg)
    for n, p in m.named_parameters():
        if n.endswith('bias'): assert (p == 0).all(), n
        elif 'norm' in n: assert (p == 1).all(), n
        else: assert abs(p.std().item() - 0.05) < 0.01 and abs(p.mean().item()) < 0.01, n


def test_dual_chunk_attention_model_equals_plain_within_one_chunk_and_decodes():
    cfg = make('tied_gqa2_theta1e4')
    _, plain = twins(cfg)
    dca_cfg = QwenConfig(**{**cfg.to_dict(), 'dual_chunk_attention_config': {'chunk_size': 24, 'local_size': 4}})
    dca = QwenForCausalLM(dca_cfg).eval(); dca.load_state_dict(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(dca(ids[:, :20]).logits, plain(ids[:, :20]).logits, atol=1e-5, rtol=0)
        full = dca(ids).logits
        assert (full - plain(ids).logits).abs().max() > 1e-3  # differs beyond one chunk (Lc = 20)
        out = dca(ids[:, :25], use_cache=True); parts = [out.logits]
        for t in range(25, 40):
            out = dca(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True); parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def small():
    return QwenForCausalLM(make('tied_gqa2_theta1e4')).eval()


def test_float_input_ids_are_a_type_error(small):
    with pytest.raises(TypeError, match='integer tensor'): small(torch.zeros(1, 4))
    with pytest.raises(TypeError, match='torch.Tensor'): small([[1, 2, 3]])
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match='labels must be an integer tensor'): small(ids, labels=ids.float())
    with pytest.raises(TypeError, match='position_ids must be an integer tensor'): small(ids, position_ids=torch.arange(4.)[None])


def test_out_of_range_ids(small):
    with pytest.raises(ValueError, match=r'token ids must be in \[0, 101\)'): small(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match='min -1'): small(torch.tensor([[-1, 3]]))


def test_too_long_sequence(small):
    with pytest.raises(ValueError, match='exceeds max_position_embeddings'): small(torch.zeros(1, 129, dtype=torch.long))
    cache = KVCache()
    with torch.no_grad(): small(torch.zeros(1, 128, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match='cached 128'): small(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_shape_errors(small):
    with pytest.raises(ValueError, match='batch, seq_len'): small(torch.zeros(4, dtype=torch.long))
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match='labels shape'): small(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match='attention_mask must be'): small(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match='position_ids must be'): small(ids, position_ids=torch.arange(4))


def test_tensors_on_different_devices(small):
    ids = torch.zeros(1, 4, dtype=torch.long, device='meta')
    with pytest.raises(ValueError, match='is on meta but the model is on cpu'): small(ids)
    with pytest.raises(ValueError, match='labels is on meta'):
        small(torch.zeros(1, 4, dtype=torch.long), labels=ids)


# ---------------------------------------------------------------- loss, logits_to_keep, MoE hook
def test_custom_cross_entropy_matches_torch_in_fp32_and_bf16():
    from qwen_edu.model import causal_lm_loss
    torch.manual_seed(0)
    labels = torch.randint(0, 300, (3, 20)); labels[0, :7] = -100
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-3)):
        logits = (torch.randn(3, 20, 300) * 3).to(dtype).requires_grad_()
        ref_logits = logits.detach().float().requires_grad_()
        loss = causal_lm_loss(logits, labels)
        ref = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
        torch.testing.assert_close(loss.float(), ref, atol=tol, rtol=0)
        (loss * 2).backward(); (ref * 2).backward()
        assert logits.grad.dtype == dtype
        torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=tol, rtol=0)


def test_logits_to_keep():
    cfg = make('tied_gqa2_theta1e4')
    _, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, logits_to_keep=2).logits, ours(ids).logits[:, -2:])
    with pytest.raises(ValueError, match='logits_to_keep'): ours(ids, labels=ids, logits_to_keep=1)


def test_moe_hook_builds_sparse_layers_and_adds_aux_loss(monkeypatch):
    """The contract with qwen_edu.moe, checked with stand-ins for its block and loss (the real ones have their own tests)."""
    calls = {}

    class FakeMoe(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate = torch.nn.Linear(config.hidden_size, config.num_experts, bias=False)
            self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, x):
            return self.proj(x), self.gate(x).reshape(-1, self.gate.out_features)

    def fake_lb(router_logits, num_experts, top_k, attention_mask=None):
        calls['args'] = (len(router_logits), num_experts, top_k, attention_mask)
        return torch.stack([r.float().pow(2).mean() for r in router_logits]).sum()

    import qwen_edu.model as model_mod
    monkeypatch.setattr(model_mod, 'QwenSparseMoeBlock', FakeMoe)
    monkeypatch.setattr(model_mod, 'load_balancing_loss', fake_lb)
    cfg = QwenConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, num_experts=6, num_experts_per_tok=2,
                     moe_intermediate_size=8, decoder_sparse_step=1, mlp_only_layers=[0], router_aux_loss_coef=0.01)
    m = QwenForCausalLM(cfg)
    assert [type(l.mlp).__name__ for l in m.model.layers] == ['QwenMLP', 'FakeMoe', 'FakeMoe', 'FakeMoe']
    ids = torch.randint(0, 50, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    out = m(ids, labels=ids, attention_mask=am)
    assert len(out.router_logits) == 3 and out.router_logits[0].shape == (14, 6)
    assert calls['args'][:3] == (3, 6, 2) and calls['args'][3].shape == (2, 7)
    plain = m(ids, attention_mask=am)
    assert plain.aux_loss is not None
    assert plain.loss is None
    from qwen_edu.model import causal_lm_loss
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.01 * out.aux_loss)
    torch.testing.assert_close(out.aux_loss, fake_lb(out.router_logits, 6, 2))
    dense = QwenForCausalLM(QwenConfig(**{**cfg.to_dict(), 'num_experts': 0, 'num_experts_per_tok': 0, 'moe_intermediate_size': 0}))
    o = dense(ids, labels=ids)
    assert o.aux_loss is None and o.router_logits is None


def test_rope_frequencies_survive_meta_build_dtype_casts_and_moves():
    cfg = make('yarn_untied')
    hf, ours = twins(cfg)
    with torch.device('meta'): m = QwenForCausalLM(cfg)
    m.load_state_dict(ours.state_dict(), assign=True)
    m.to('cpu')
    ids = torch.randint(0, cfg.vocab_size, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        m.bfloat16()
        assert m.model.inv_freq(torch.device('cpu')).dtype == torch.float32
        assert m.model.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
        assert m(ids).logits.dtype == torch.bfloat16


def test_bf16_close_to_transformers_bf16():
    cfg = make('tied_gqa2_theta1e4')
    hf, ours = twins(cfg, attn='sdpa')
    hf.bfloat16(); ours.bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad(): a, b = ours(ids, labels=ids), hf(ids, labels=ids)
    assert a.logits.dtype == torch.bfloat16
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=0.07, rtol=0)  # a few bf16 ulps
    assert abs(a.loss.item() - b.loss.item()) < 5e-3


def test_cache_with_gradients_concatenates_and_backpropagates():
    cfg = make('tied_gqa2_theta1e4')
    _, ours = twins(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = ours(ids).logits
    o = ours(ids[:, :7], use_cache=True)
    o2 = ours(ids[:, 7:], past_key_values=o.past_key_values, use_cache=True)
    both = torch.cat([o.logits, o2.logits], 1)
    torch.testing.assert_close(both, full, atol=1e-5, rtol=0)
    both.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


# ---------------------------------------------------------------- packed rows (document_ids), empty losses
def packed_row(cfg, lengths, T, seed=0):
    "Random conversations of `lengths` packed into one row of T (tail padding): ids, position_ids, document_ids."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    pos, doc = torch.zeros(1, T, dtype=torch.long), torch.full((1, T), len(lengths), dtype=torch.long)
    at = 0
    for d, n in enumerate(lengths):
        pos[0, at:at + n], doc[0, at:at + n] = torch.arange(n), d; at += n
    return ids, pos, doc


@pytest.mark.parametrize('attn', ['sdpa', 'eager'])
@pytest.mark.parametrize('name', ['tied_gqa2_theta1e4', 'yarn_untied'])
def test_document_ids_make_every_packed_conversation_equal_its_own_run(name, attn):
    cfg = make(name)
    _, ours = twins(cfg)
    ours.set_attn_implementation(attn)
    rows = [packed_row(cfg, [5, 7, 4], 18, seed=1), packed_row(cfg, [3, 9, 2, 4], 18, seed=2)]
    ids, pos, doc = (torch.cat(t) for t in zip(*rows))
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, document_ids=doc).logits
        leaky = ours(ids, position_ids=pos).logits  # plain causal mask: later conversations see earlier ones
        for r, lengths in enumerate(([5, 7, 4], [3, 9, 2, 4])):
            at = 0
            for n in lengths:
                alone = ours(ids[r:r + 1, at:at + n]).logits[0]
                torch.testing.assert_close(packed[r, at:at + n], alone, atol=1e-5, rtol=0)
                at += n
        assert (leaky[0, 5:12] - packed[0, 5:12]).abs().max() > 1e-3
        # one document per row is the plain causal model
        torch.testing.assert_close(ours(ids, document_ids=torch.zeros_like(ids)).logits, ours(ids).logits, atol=1e-6, rtol=0)


def test_document_ids_match_transformers_packed_position_ids():
    "transformers infers the same block-diagonal mask from restarting position_ids (no attention_mask, no cache)."
    cfg = make('tied_gqa2_theta1e4')
    for attn in ('eager', 'sdpa'):
        hf, ours = twins(cfg, attn=attn)
        ids, pos, doc = packed_row(cfg, [6, 8, 5], 22, seed=3)
        pos[0, -3:] = torch.arange(3)  # the padding tail is a document of its own (positions 0, 1, 2)
        with torch.no_grad():
            ref = hf(ids, position_ids=pos, use_cache=False).logits
            torch.testing.assert_close(ours(ids, position_ids=pos, document_ids=doc).logits, ref, atol=1e-5, rtol=0)


def test_document_ids_errors(small):
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match='document_ids must be'): small(ids, document_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match='document_ids must be an integer tensor'): small(ids, document_ids=torch.zeros(2, 4))
    with torch.no_grad(): out = small(ids, use_cache=True)
    with pytest.raises(ValueError, match='document_ids needs an empty cache'):
        small(ids, past_key_values=out.past_key_values, use_cache=True, document_ids=torch.zeros_like(ids))
    dca = QwenForCausalLM(QwenConfig(**{**make('tied_gqa2_theta1e4').to_dict(),
                                        'dual_chunk_attention_config': {'chunk_size': 24, 'local_size': 4}}))
    with pytest.raises(ValueError, match='Dual Chunk Attention'): dca(ids, document_ids=torch.zeros_like(ids))


def test_loss_with_no_labelled_token_is_zero_with_zero_gradient():
    "F.cross_entropy(reduction='mean') returns nan when every target is ignored; ours returns 0 (a sum over no tokens)."
    from qwen_edu.model import causal_lm_loss
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    assert torch.isnan(torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    loss = causal_lm_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    labels[0, 0] = 3  # only the first token is labelled: nothing predicts it (labels are shifted)
    assert causal_lm_loss(logits, labels).item() == 0.0



@pytest.mark.parametrize('bad', [lambda V: -1, lambda V: -2, lambda V: V, lambda V: V + 7], ids=['-1', '-2', 'V', 'V+7'])
def test_labels_outside_vocab_and_not_minus_100_are_a_clear_error(small, bad):
    "A label must be a token id or -100: -1 must not be clamped to token 0, one >= vocab_size must not be an index error."
    from qwen_edu.model import causal_lm_loss
    V = small.config.vocab_size
    ids = torch.randint(0, V, (2, 5))
    labels = ids.clone(); labels[0, 0] = -100; labels[1, 3] = bad(V)
    with pytest.raises(ValueError, match=rf'labels must be token ids in \[0, {V}\) or -100 \(ignored\), got {bad(V)} '
                                         rf'at \[1, 3\] \(1 such label\) with vocab_size {V}'):
        small(ids, labels=labels)
    with pytest.raises(ValueError, match=rf'got {bad(V)} at \[1, 3\] .*vocab_size {V}'):
        causal_lm_loss(torch.randn(2, 5, V), labels)
    labels[1, 3] = -100; labels[0, 1] = V - 1  # the edges are fine
    with torch.no_grad(): assert torch.isfinite(small(ids, labels=labels).loss)


def test_moe_model_checks_labels_too():
    "The MoE model is QwenForCausalLM with sparse layers: the same loss path, the same error."
    cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16)
    m = QwenForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert m(ids, labels=ids).aux_loss is not None
        with pytest.raises(ValueError, match='got -1 at \\[0, 2\\].*vocab_size 64'): m(ids, labels=ids.index_fill(1, torch.tensor([2]), -1))


# --- the loss without the logits (return_logits=False), meta init, activation checkpointing ---
def _tiny(tie=True, moe=False, seed=0, **kw):
    d = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    if moe: d.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                     router_aux_loss_coef=0.05)
    torch.manual_seed(seed)
    return QwenForCausalLM(QwenConfig(**{**d, **kw}))


@pytest.mark.parametrize('tie,moe', [(True, False), (False, False), (False, True)])
def test_chunked_loss_equals_full_loss_and_grads(tie, moe):
    from qwen_edu.model import chunked_causal_lm_loss
    m = _tiny(tie, moe)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(1))
    labels = ids.clone(); labels[0, :7] = -100; labels[2, 10] = -100
    am = torch.ones_like(ids); am[1, :4] = 0
    full = m(ids, labels=labels, attention_mask=am)
    gfull = torch.autograd.grad(full.loss, list(m.parameters()))
    chunked = m(ids, labels=labels, attention_mask=am, return_logits=False)
    assert chunked.logits is None
    gchunk = torch.autograd.grad(chunked.loss, list(m.parameters()))
    torch.testing.assert_close(chunked.loss, full.loss, atol=1e-6, rtol=1e-6)
    if moe: torch.testing.assert_close(chunked.aux_loss, full.aux_loss)  # the aux loss is added the same way
    for (n, _), a, b in zip(m.named_parameters(), gchunk, gfull): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=n)
    h = torch.randn(2, 9, 32, requires_grad=True)
    for chunk in (1, 4, 100):  # chunks that do not divide the 18 tokens
        l = chunked_causal_lm_loss(h, m.lm_head.weight, labels[:2, :9], chunk_size=chunk)
        torch.testing.assert_close(l, causal_lm_loss_ref(m.lm_head(h), labels[:2, :9]), atol=1e-6, rtol=1e-6)


def causal_lm_loss_ref(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def test_chunked_loss_edge_cases():
    m = _tiny()
    ids = torch.randint(0, 300, (2, 9))
    none = torch.full_like(ids, -100)  # no counted token: 0 and a zero gradient, as the fused loss
    out = m(ids, labels=none, return_logits=False)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    with torch.no_grad():  # no graph: no gradient work, same value
        torch.testing.assert_close(m(ids, labels=ids, return_logits=False).loss, m(ids, labels=ids).loss)
    with pytest.raises(ValueError, match='return_logits=False'): m(ids, return_logits=False)
    bad = ids.clone(); bad[0, 0] = -5
    with pytest.raises(ValueError, match='labels must be token ids'): m(ids, labels=bad, return_logits=False)


@pytest.mark.parametrize('moe', [False, True])
def test_shift_labels_false_equals_train_lm_loss(moe):
    "labels already aligned with positions (the training loop's y): same loss as qwen_edu.train.lm_loss with the aux coef."
    from qwen_edu.train import lm_loss
    m = _tiny(moe=moe)
    x, y = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2, 12))
    ref = lm_loss(m(x), y, aux_coef=m.config.router_aux_loss_coef if moe else 0.0)
    for rl in (True, False):
        torch.testing.assert_close(m(x, labels=y, shift_labels=False, return_logits=rl).loss, ref, atol=1e-6, rtol=1e-6)


def test_chunked_loss_under_autocast_matches_lm_head():
    m = _tiny(tie=False)
    ids = torch.randint(0, 300, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = m(ids, labels=ids).loss
        b = m(ids, labels=ids, return_logits=False).loss
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)  # both multiply the head in bf16


_RSS_SCRIPT = r'''
import resource, torch
torch.set_num_threads(2)
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
c = QwenConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0); m = QwenForCausalLM(c)
x = torch.randint(0, c.vocab_size, (4, 2048))
m(x[:, :8], labels=x[:, :8], return_logits=False).loss.backward(); m.zero_grad(set_to_none=True)  # warm up the libraries
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loss = m(x, labels=x, return_logits=False).loss
loss.backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, loss.item())
'''


def test_chunked_loss_memory_at_qwen_vocabulary():
    "8,192 tokens x 151,936 entries: the fp32 logits alone would be 5 GB; forward + backward grows the peak RSS < 1.5 GB."
    import subprocess, sys, os
    r = subprocess.run([sys.executable, '-c', _RSS_SCRIPT], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '2'}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    grown, loss = r.stdout.split()
    assert int(grown) < 1.5e9, f"peak RSS grew by {int(grown) / 1e9:.2f} GB"
    assert abs(float(loss) - math.log(151936)) < 0.1  # a random model: about log(vocab)


@pytest.mark.parametrize('tie,moe', [(True, False), (False, True)])
def test_meta_init_equals_constructor(tie, moe):
    "from_config on meta, to_empty, init_weights: the constructor's weights under the same seed, head tied again."
    a = _tiny(tie, moe, seed=3)
    torch.manual_seed(3)
    b = QwenForCausalLM.from_config(a.config, device='meta')
    assert all(p.is_meta for p in b.parameters())
    b.to_empty(device='cpu').init_weights()
    assert (b.lm_head.weight is b.model.embed_tokens.weight) == tie
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), k
    if moe:  # the non-persistent load counters are zero again, not to_empty's garbage
        assert all(not blk.tokens_per_expert.any() for blk in b.modules() if hasattr(blk, 'tokens_per_expert'))
    ids = torch.randint(0, 300, (1, 7))
    torch.testing.assert_close(b(ids).logits, a(ids).logits)


def test_meta_build_of_72b_is_instant():
    import time
    c = QwenConfig.from_preset('qwen2.5-72b')
    t0 = time.perf_counter()
    m = QwenForCausalLM.from_config(c, device='meta')
    assert time.perf_counter() - t0 < 10  # ~1 s here; a real build would need 290 GB and minutes
    assert sum(p.numel() for p in m.parameters()) == c.num_params()
    assert all(p.is_meta for p in m.parameters())


@pytest.mark.parametrize('moe', [False, True])
def test_activation_checkpointing_same_grads_and_recomputes(moe):
    m = _tiny(tie=False, moe=moe)
    ids = torch.randint(0, 300, (2, 16))
    calls = []
    m.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    def grads():
        m.zero_grad(set_to_none=True)
        if moe:
            for b in m.modules():
                if hasattr(b, 'tokens_per_expert'): b.tokens_per_expert.zero_()
        m(ids, labels=ids).loss.backward()
        load = [b.tokens_per_expert.clone() for b in m.modules() if hasattr(b, 'tokens_per_expert')]
        return [p.grad.clone() for p in m.parameters()], load
    g1, load1 = grads()
    assert len(calls) == 1
    m.set_activation_checkpointing(True)
    g2, load2 = grads()
    assert len(calls) == 3  # forward and the recomputation in the backward
    for a, b in zip(g1, g2): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(load1, load2): assert torch.equal(a, b)  # the recomputation does not count tokens twice
    with torch.no_grad(): m(ids)  # no graph: nothing to recompute, runs plainly
    assert len(calls) == 4


@pytest.mark.parametrize('moe', [False, True])
def test_per_token_losses_equal_cross_entropy(moe):
    "loss_reduction='none': each position's loss, with or without the logits, equal to F.cross_entropy; no aux loss."
    m = _tiny(tie=False, moe=moe)
    ids = torch.randint(0, 300, (2, 16)); lb = ids.clone(); lb[0, :5] = -100
    logits = m(ids).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 300), lb[:, 1:].reshape(-1), reduction='none').view(2, 15)
    with torch.no_grad():
        for rl in (True, False):
            per = m(ids, labels=lb, return_logits=rl, loss_reduction='none').loss
            assert per.shape == (2, 16) and (per[:, -1] == 0).all() and (per[0, :4] == 0).all()
            torch.testing.assert_close(per[:, :-1], ref.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='no gradient'):
        m(ids, labels=lb, return_logits=False, loss_reduction='none')
    with pytest.raises(ValueError, match="'mean' or 'none'"):
        m(ids, labels=lb, loss_reduction='sum')


def test_without_value_checks_the_padding_mask_is_built_and_equal():
    "check_values=False reads nothing back: an all-ones padding mask is built, not dropped, and gives the same logits."
    m = _tiny(tie=False)
    ids = torch.randint(0, 300, (2, 16))
    a = m(ids, attention_mask=torch.ones_like(ids)).logits
    b = m.set_value_checks(False)(ids, attention_mask=torch.ones_like(ids)).logits
    m.set_value_checks(True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    from qwen_edu.model import build_attention_mask
    assert build_attention_mask(torch.ones(2, 16), 16, 0, 'cpu')[0] is None
    assert build_attention_mask(torch.ones(2, 16), 16, 0, 'cpu', read_values=False)[0].shape == (2, 1, 16, 16)


def test_fastloss_sits_below_model():
    "qwen_edu.fastloss (appendix A8) imports no qwen_edu module; qwen_edu.model uses and keeps its names."
    from pathlib import Path
    import qwen_edu.fastloss as fl, qwen_edu.model as model
    src = (Path(__file__).resolve().parent.parent / 'qwen_edu' / 'fastloss.py').read_text()
    assert 'qwen_edu' not in src.replace('nbs/A8_model_training', '') and 'from .' not in src
    for name in ('CrossEntropy', 'next_token_targets', 'loss_chunk_size', 'chunked_causal_lm_loss', 'chunked_token_nll'):
        assert getattr(model, name) is getattr(fl, name), name
