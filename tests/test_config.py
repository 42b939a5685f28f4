"""QwenConfig presets and parameter/FLOP counts, checked against the real modules on the meta device."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from qwen_edu.config import QwenConfig, PRESETS, QWEN25_SIZES
from qwen_edu.model import QwenForCausalLM

# exact parameter counts of the released checkpoints
RELEASED = {'qwen2.5-0.5b': 494_032_768, 'qwen2.5-1.5b': 1_543_714_304, 'qwen2.5-3b': 3_085_938_688,
            'qwen2.5-7b': 7_615_616_512, 'qwen2.5-14b': 14_770_033_664, 'qwen2.5-32b': 32_763_876_352,
            'qwen2.5-72b': 72_706_203_648}
# released config.json: hidden, layers, q heads, kv heads, intermediate, vocab, tied
RELEASED_SHAPES = {'qwen2.5-0.5b': (896, 24, 14, 2, 4864, 151936, True),
                   'qwen2.5-1.5b': (1536, 28, 12, 2, 8960, 151936, True),
                   'qwen2.5-3b': (2048, 36, 16, 2, 11008, 151936, True),
                   'qwen2.5-7b': (3584, 28, 28, 4, 18944, 152064, False),
                   'qwen2.5-14b': (5120, 48, 40, 8, 13824, 152064, False),
                   'qwen2.5-32b': (5120, 64, 40, 8, 27648, 152064, False),
                   'qwen2.5-72b': (8192, 80, 64, 8, 29568, 152064, False)}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_presets_are_the_released_shapes():
    assert QWEN25_SIZES == list(RELEASED_SHAPES)
    for name, shape in RELEASED_SHAPES.items():
        c = QwenConfig.from_preset(name)
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == shape
        assert (c.rope_theta, c.rms_norm_eps, c.head_dim) == (1e6, 1e-6, c.hidden_size // c.num_attention_heads)
        assert c.max_position_embeddings in (32768, 131072)


@pytest.mark.parametrize('name', list(RELEASED))
def test_param_counts_match_released_models(name):
    c = QwenConfig.from_preset(name)
    assert c.num_params() == RELEASED[name]
    with torch.device('meta'): m = QwenForCausalLM(c)
    assert n_params(m) == RELEASED[name]


@pytest.mark.parametrize('name', ['qwen2.5-0.5b', 'qwen2.5-7b', 'qwen2.5-14b', 'edu-tiny'])
def test_param_counts_match_transformers_on_meta(name):
    c = QwenConfig.from_preset(name)
    hc = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings)
    with torch.device('meta'): hf = Qwen2ForCausalLM(hc)
    assert n_params(hf) == c.num_params()


def test_every_preset_counts_on_meta_and_edu_sizes():
    for name in set(PRESETS) - set(RELEASED):  # the released sizes are built in the test above
        c = QwenConfig.from_preset(name)
        with torch.device('meta'): m = QwenForCausalLM(c)
        assert n_params(m) == c.num_params(), name
        # dense presets activate every parameter; MoE presets (registered once qwen_edu.moe is imported) fewer
        assert (c.num_active_params() == c.num_params()) == (c.num_experts == 0), name
    assert 2e6 < QwenConfig.from_preset('edu-tiny').num_params() < 8e6
    assert 20e6 < QwenConfig.from_preset('edu-small').num_params() < 30e6
    assert 110e6 < QwenConfig.from_preset('edu-base').num_params() < 140e6
    assert QwenConfig.from_preset('edu-tiny').vocab_size == 8192


def test_non_embedding_counts():
    c = QwenConfig.from_preset('qwen2.5-7b')
    assert c.num_params() - c.num_params(non_embedding=True) == 2 * 152064 * 3584
    c = QwenConfig.from_preset('qwen2.5-0.5b')
    assert c.num_params() - c.num_params(non_embedding=True) == 151936 * 896
    assert round(c.num_params(non_embedding=True) / 1e9, 2) == 0.36


def test_flops_per_token():
    c = QwenConfig.from_preset('edu-tiny')
    n_matmul = c.num_params(non_embedding=True) + c.vocab_size * c.hidden_size  # head counts, lookup does not
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 256
    assert c.flops_per_token(256) == 6 * n_matmul + attn
    assert c.flops_per_token(512) > c.flops_per_token(256)


def test_moe_counting_and_sparse_layers():
    # Qwen1.5-MoE-A2.7B shape: 14.3B total, 2.7B active (counts from the config alone)
    c = QwenConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, num_experts=60,
                   num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632)
    assert round(c.num_params() / 1e9, 1) == 14.3
    assert round(c.num_active_params() / 1e9, 1) == 2.7
    c2 = QwenConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, num_hidden_layers=6,
                    decoder_sparse_step=2, mlp_only_layers=[3])
    assert [c2.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert not QwenConfig().is_moe_layer(0)


def test_overrides_and_roundtrip():
    c = QwenConfig.from_preset('edu-tiny', num_hidden_layers=2, rope_theta=1e6)
    assert (c.num_hidden_layers, c.rope_theta) == (2, 1e6)
    assert QwenConfig(**c.to_dict()) == c
    c = QwenConfig(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert c.rope_scaling['rope_type'] == c.rope_scaling['type'] == 'yarn'


@pytest.mark.parametrize('kw, msg', [
    (dict(hidden_size=100, num_attention_heads=14), 'divisible by num_attention_heads'),
    (dict(num_attention_heads=14, num_key_value_heads=4), 'divisible by\nnum_key_value_heads|num_key_value_heads'),
    (dict(num_hidden_layers=0), 'num_hidden_layers must be a positive int'),
    (dict(vocab_size=1.5), 'vocab_size must be a positive int'),
    (dict(rope_scaling={"type": "yarn"}), 'factor'),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), 'not supported'),
    (dict(num_experts=4, num_experts_per_tok=5), 'num_experts_per_tok'),
    (dict(num_experts=0, num_experts_per_tok=4, moe_intermediate_size=1408), 'num_experts is 0'),
    (dict(num_experts=4, num_experts_per_tok=2), 'moe_intermediate_size must be > 0'),
    (dict(dual_chunk_attention_config={"chunk_size": 8, "local_size": 8}), 'local_size < chunk_size'),
])
def test_bad_configs_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg): QwenConfig(**kw)


@pytest.mark.parametrize('kw, msg', [
    (dict(hidden_size=7), r'hidden_size 7 is not divisible by num_attention_heads 8 \(head_dim would be 0\)'),
    (dict(hidden_size=4), r'hidden_size 4 is not divisible by num_attention_heads 8 \(head_dim would be 0\).*multiple of'),
    (dict(hidden_size=12), r'hidden_size 12 is not divisible by num_attention_heads 8 \(head_dim would be 1\)'),
    (dict(hidden_size=8), r'head_dim 1 \(hidden_size 8 / num_attention_heads 8\) must be even for RoPE.*hidden_size'),
    (dict(num_attention_heads=0), 'num_attention_heads must be a positive int, got 0'),
    (dict(head_dim=0), 'head_dim must be a positive int, got 0'),
    (dict(head_dim=7), r'head_dim 7 must be even for RoPE'),
])
def test_cli_like_size_overrides_name_the_field_the_user_set(kw, msg):
    "`--hidden-size 7` is QwenConfig.from_preset('edu-tiny', hidden_size=7): the error names hidden_size, not head_dim 0."
    with pytest.raises(ValueError, match=msg) as e: QwenConfig.from_preset('edu-tiny', **kw)
    if 'head_dim' not in kw: assert 'head_dim must be a positive int' not in str(e.value)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match='unknown preset'): QwenConfig.from_preset('qwen2.5-8b')
    with pytest.raises(ValueError, match='unknown config fields'): QwenConfig.from_preset('edu-tiny', hiden_size=8)


def test_preset_table_and_cli(capsys):
    from qwen_edu.config import preset_table, params_cli
    t = preset_table(['qwen2.5-0.5b', 'qwen2.5-72b'])
    assert '| qwen2.5-0.5b | 896 | 24 | 14/2 | 4864 | 151936 | yes | 494.0M | 357.9M |' in t
    assert '| qwen2.5-72b | 8192 | 80 | 64/8 | 29568 | 152064 | no | 72.71B | 70.21B |' in t
    assert params_cli(['edu-tiny']) == 0 and 'edu-tiny' in capsys.readouterr().out
    assert params_cli(['nope']) == 2 and 'unknown preset' in capsys.readouterr().out


# --- training memory (estimate_train_memory, check_fits) ---

def test_estimate_train_memory_parts():
    from qwen_edu.config import estimate_train_memory
    c = QwenConfig.from_preset('qwen2.5-72b')
    n = c.num_params()
    e = estimate_train_memory(c, 8, 1024)
    assert (e['weights'], e['grads'], e['optimizer']) == (4 * n, 4 * n, 8 * n)  # fp32 weights, grads, two AdamW moments
    assert e['total'] == sum(v for k, v in e.items() if k != 'total') and 1.2e12 < e['total'] < 3e12
    assert e['logits'] == 8 * 1024 * c.vocab_size * 16
    bf = estimate_train_memory(c, 8, 1024, param_dtype='bf16', optimizer='sgd')
    assert (bf['weights'], bf['optimizer']) == (2 * n, 0)
    # micro-batch memory: accumulation adds none, autocast keeps 16-bit activations (plus 16-bit weight copies)
    assert estimate_train_memory(c, 8, 1024, grad_accum=4) == e
    tiny = QwenConfig.from_preset('edu-tiny')
    a32 = estimate_train_memory(tiny, 64, 512)['activations']
    assert estimate_train_memory(tiny, 64, 512, autocast_dtype='bf16')['activations'] < a32
    assert estimate_train_memory(tiny, 16, 128)['total'] < 1e9


@pytest.mark.parametrize('kw, msg', [(dict(batch_size=0), 'batch_size must be a positive int'),
                                     (dict(seq_len=1.5), 'seq_len must be a positive int'),
                                     (dict(param_dtype='int8'), 'param_dtype must be one of'),
                                     (dict(optimizer='lion'), 'optimizer must be one of')])
def test_estimate_train_memory_bad_input(kw, msg):
    from qwen_edu.config import estimate_train_memory
    with pytest.raises(ValueError, match=msg):
        estimate_train_memory(QwenConfig.from_preset('edu-tiny'), **{'batch_size': 4, 'seq_len': 64, **kw})


def _saved_bytes(cfg, B, T, autocast):
    "Bytes of the tensors autograd saves in one forward (parameters excluded, storages counted once)."
    m = QwenForCausalLM(cfg)
    params, seen = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params: seen[s.data_ptr()] = s.nbytes()
        return t
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast): m(x)
    return sum(seen.values())


@pytest.mark.parametrize('autocast', [False, True])
def test_activation_formula_counts_what_autograd_saves(autocast):
    from qwen_edu.config import activation_bytes_per_token
    B, T = 2, 32
    one, two = (QwenConfig.from_preset('edu-tiny', num_hidden_layers=n, vocab_size=512) for n in (1, 2))
    per_layer = _saved_bytes(two, B, T, autocast) - _saved_bytes(one, B, T, autocast)
    expected = B * T * activation_bytes_per_token(two, 'bf16' if autocast else None)
    if autocast:  # plus the bf16 copies of the layer's weight matrices
        h, I, kvd = two.hidden_size, two.intermediate_size, two.num_key_value_heads * two.head_dim
        expected += 2 * (2 * h * h + 2 * h * kvd + 3 * h * I)
    assert per_layer == expected


def test_check_fits_refuses_with_the_numbers_and_what_fits():
    from qwen_edu.config import check_fits, NotEnoughMemoryError
    c = QwenConfig.from_preset('qwen2.5-72b')
    with pytest.raises(NotEnoughMemoryError) as e:
        check_fits(c, 8, 1024, name='qwen2.5-72b', what='pre-training', available=100e9)
    msg = str(e.value)
    assert isinstance(e.value, MemoryError)
    assert msg.startswith('pre-training qwen2.5-72b at batch 8 x 1024 needs about ') and ' TB (weights 291 GB, ' in msg
    # the alternatives are judged at the same vocabulary (152,064 here: edu-tiny's logits alone are 20 GB)
    assert 'this machine has 100 GB available: choose a smaller --preset (edu-mini, edu-tiny, ' in msg
    assert 'edu-base' in msg and 'qwen2.5-0.5b' in msg and 'qwen2.5-1.5b' not in msg
    est = check_fits(QwenConfig.from_preset('edu-tiny'), 16, 128, available=20e9)
    assert est['total'] < 20e9
    with pytest.raises(NotEnoughMemoryError, match='no preset fits'):
        check_fits(QwenConfig.from_preset('edu-tiny'), 16, 128, available=1e6)


def test_available_memory_is_positive():
    from qwen_edu.config import available_memory
    assert 0 < available_memory('cpu') < 1 << 50


def test_estimate_is_close_to_the_measured_peak():
    "Sanity (generous bounds): the estimate vs the peak RSS increase of a few real fp32 AdamW steps on the CPU."
    from qwen_edu.config import estimate_train_memory, measure_train_peak
    c = QwenConfig.from_preset('edu-tiny')
    measured = measure_train_peak('edu-tiny', 8, 128)
    est = estimate_train_memory(c, 8, 128)
    assert 0.3 < (est['total'] - est['runtime']) / measured < 3


def test_params_cli_memory_column(capsys):
    from qwen_edu.config import params_cli
    assert params_cli(['edu-tiny', 'qwen2.5-72b', '--batch-size', '8', '--seq-len', '1024']) == 0
    out = capsys.readouterr().out
    assert 'train memory @ 8 x 1024 (fp32)' in out and ' TB |' in out
