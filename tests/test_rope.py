"""RoPE, YaRN (against transformers' _compute_yarn_parameters) and Dual Chunk Attention checks."""
import math
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, Qwen2RotaryEmbedding
from qwen_edu.config import QwenConfig
from qwen_edu.rope import (default_inv_freq, rope_cos_sin, apply_rope, rope_parameters, yarn_inv_freq,
                           dual_chunk_attention, dual_chunk_attention_reference, dca_positions, dca_regions)


def hf_cfg(d, theta, maxpos, rp=None):
    rp = dict(rope_type='default') if rp is None else dict(rope_type='yarn', **rp)
    return Qwen2Config(hidden_size=d * 4, num_attention_heads=4, max_position_embeddings=maxpos,
                       rope_parameters=dict(rope_theta=theta, **rp))


@pytest.mark.parametrize('d, theta', [(64, 1e4), (128, 1e6), (32, 1e7)])
def test_cos_sin_and_rotation_match_transformers(d, theta):
    hc = hf_cfg(d, theta, 4096)
    rot = Qwen2RotaryEmbedding(hc)
    pos = torch.tensor([[0, 5, 100, 4095], [7, 8, 9, 30000]])
    x = torch.randn(2, 3, 4, d)
    cos_hf, sin_hf = rot(x, pos)
    cfg = QwenConfig(hidden_size=d * 4, num_attention_heads=4, num_key_value_heads=4, rope_theta=theta)
    inv, att = rope_parameters(cfg)
    assert torch.equal(inv, rot.inv_freq) and att == 1.0
    cos, sin = rope_cos_sin(pos, inv, att, x.dtype)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    q_hf, k_hf = apply_rotary_pos_emb(x, x * 2, cos_hf, sin_hf)
    assert torch.equal(apply_rope(x, cos, sin), q_hf) and torch.equal(apply_rope(x * 2, cos, sin), k_hf)


def test_cos_sin_are_fp32_then_cast():
    pos = torch.tensor([[30001]])
    inv = default_inv_freq(128, 1e6)
    c32, _ = rope_cos_sin(pos, inv)
    cbf, _ = rope_cos_sin(pos, inv, dtype=torch.bfloat16)
    assert torch.equal(cbf, c32.to(torch.bfloat16))


YARN_CASES = [
    (128, 1e6, dict(factor=4.0, original_max_position_embeddings=32768)),  # Qwen2.5's setting
    (64, 1e4, dict(factor=8.0, original_max_position_embeddings=4096, beta_fast=16, beta_slow=2)),
    (128, 1e6, dict(factor=4.0, original_max_position_embeddings=32768, truncate=False)),
    (64, 1e6, dict(factor=2.0, original_max_position_embeddings=1024, attention_factor=1.3)),
    (64, 1e4, dict(factor=4.0, original_max_position_embeddings=2048, mscale=1.0, mscale_all_dim=0.5)),
    (16, 1e4, dict(factor=1.0, original_max_position_embeddings=64)),
]


@pytest.mark.parametrize('d, theta, rp', YARN_CASES)
def test_yarn_matches_transformers(d, theta, rp):
    maxpos = int(rp['factor'] * rp['original_max_position_embeddings'])
    inv_hf, att_hf = ROPE_INIT_FUNCTIONS['yarn'](hf_cfg(d, theta, maxpos, dict(rp)), 'cpu')
    cfg = QwenConfig(hidden_size=d * 4, num_attention_heads=4, num_key_value_heads=4, rope_theta=theta,
                     max_position_embeddings=maxpos, rope_scaling=dict(type='yarn', **rp))
    inv, att = rope_parameters(cfg)
    assert torch.equal(inv, inv_hf)
    assert att == pytest.approx(att_hf, abs=0)


def test_yarn_shape_of_the_ramp():
    inv, att = yarn_inv_freq(128, 1e6, 4.0, 32768)
    base = default_inv_freq(128, 1e6)
    ratio = inv / base
    assert torch.allclose(ratio[:5], torch.ones(5))  # fast pairs extrapolate (unchanged)
    assert torch.allclose(ratio[-5:], torch.full((5,), 0.25))  # slow pairs interpolate by the factor
    assert (ratio[1:] <= ratio[:-1] + 1e-7).all()  # monotone ramp in between
    assert att == pytest.approx(0.1 * math.log(4) + 1)


def test_rope_scaling_type_key_and_unknown():
    c1 = QwenConfig(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    c2 = QwenConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert torch.equal(rope_parameters(c1)[0], rope_parameters(c2)[0])


def plain(q, k, v, inv, pos, key_mask=None):
    c, s = rope_cos_sin(pos, inv)
    n_rep = q.shape[1] // k.shape[1]
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if key_mask is not None: mask = mask & key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(apply_rope(q, c, s), apply_rope(k, c, s).repeat_interleave(n_rep, 1),
                                          v.repeat_interleave(n_rep, 1), attn_mask=mask)


@pytest.mark.parametrize('T', [1, 7, 20])
def test_dca_equals_plain_attention_within_one_chunk(T):
    torch.manual_seed(T)
    q, k, v = torch.randn(2, 6, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    pos = torch.arange(T).expand(2, T)
    inv = default_inv_freq(16, 1e4)
    out = dual_chunk_attention(q, k, v, inv, chunk_size=24, local_size=4, q_pos=pos, k_pos=pos)
    torch.testing.assert_close(out, plain(q, k, v, inv, pos), atol=1e-5, rtol=0)


def test_dca_lse_merge_equals_single_softmax_and_differs_beyond_a_chunk():
    torch.manual_seed(0)
    T = 50
    q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    pos = torch.arange(T)[None]
    inv = default_inv_freq(16, 1e4)
    km = torch.ones(1, T, dtype=torch.bool); km[0, 3] = False
    out = dual_chunk_attention(q, k, v, inv, 16, 4, pos, pos, key_mask=km, attention_scaling=1.1)
    ref = dual_chunk_attention_reference(q, k, v, inv, 16, 4, pos, pos, key_mask=km, attention_scaling=1.1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - plain(q, k, v, inv, pos, km)).abs().max() > 1e-2


def test_dca_positions_and_regions():
    pos = torch.arange(30)[None]
    intra, succ, inter = dca_positions(pos, 10, 2)  # Lc = 8
    assert intra.tolist()[0][:10] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert succ.tolist()[0][:10] == [8, 9, 10, 10, 10, 10, 10, 10, 8, 9]
    assert set(inter.flatten().tolist()) == {10}
    r_intra, r_succ, r_inter = dca_regions(pos, pos, 10, 2)
    # every causal (query, key) pair is in exactly one region, and no future key in any
    total = r_intra.int() + r_succ.int() + r_inter.int()
    assert torch.equal(total[0, 0].bool(), torch.ones(30, 30, dtype=torch.bool).tril())
    assert (total <= 1).all()
    # query 20 (chunk starting at 16): intra keys 16..20, successive 8..15, inter 0..7
    assert r_intra[0, 0, 20].nonzero().flatten().tolist() == list(range(16, 21))
    assert r_succ[0, 0, 20].nonzero().flatten().tolist() == list(range(8, 16))
    assert r_inter[0, 0, 20].nonzero().flatten().tolist() == list(range(0, 8))


def test_dca_bad_sizes():
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match='local_size'):
        dual_chunk_attention(q, q, q, default_inv_freq(8, 1e4), 4, 4, torch.arange(2)[None], torch.arange(2)[None])
