"""Long context (chapter 19): passkey/RULER prompts and scoring, the training mix, exact resume of a two-stage run,
YaRN against transformers, DCA against full attention, long generation, and the errors a user meets."""
import random, re
import numpy as np
import pytest
import torch
from qwen_edu.data import ByteTokenizer
from qwen_edu.longctx import (INTRO, QUESTION, MAX_KEY, passkey_prompt, score_answer, first_integer, is_held_out_key,
                              draw_key, multikey_prompt, variable_tracking_prompt, retrieval_example, LongMix,
                              long_documents, document_stream, small_config, Stage, train_stage, run_stages,
                              variant_model, supported_length, check_eval_length, generate_long, passkey_grid,
                              ruler_task, loss_by_position, two_stage, progressive, kv_cache_bytes)
from qwen_edu.model import QwenForCausalLM

bt = ByteTokenizer()


@pytest.fixture(scope='module')
def docs():
    return document_stream(bt, long_documents('train')[:40], bt.eos_id)


@pytest.fixture(scope='module')
def short_model():
    torch.manual_seed(0)
    return QwenForCausalLM(small_config(bt.vocab_size, 64, 2, L=256)).eval()


# ---- prompts and scoring
@pytest.mark.parametrize('n', [400, 777, 2048])
@pytest.mark.parametrize('depth', [0.0, 0.3, 1.0])
def test_passkey_prompt_length_and_content(n, depth):
    p = passkey_prompt(bt, n, depth, 4242, seed=5)
    assert abs(len(p) - n) <= 0.02 * n  # the protocol's tolerance; the builder is exact
    t = bt.decode(p)
    assert t.startswith(INTRO) and t.endswith(QUESTION)
    assert t.count('The pass key is 4242. Remember it. 4242 is the pass key.') == 1


def test_passkey_depth_moves_the_needle():
    pos = [bt.decode(passkey_prompt(bt, 2000, d, 4242)).index('4242') for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert pos == sorted(pos) and pos[0] < 300 and pos[-1] > 1800


def test_passkey_prompt_is_seeded():
    assert passkey_prompt(bt, 900, 0.5, 7, seed=1) == passkey_prompt(bt, 900, 0.5, 7, seed=1)
    assert passkey_prompt(bt, 900, 0.5, 7, seed=1) != passkey_prompt(bt, 900, 0.5, 7, seed=2)


def test_scorer_exact_match():
    assert score_answer(' 31337. Remember', 31337)
    assert not score_answer(' 3133', 31337) and not score_answer(' 313370', 31337)
    assert not score_answer('none', 31337)
    assert first_integer('a 12 b 34') == 12 and first_integer('x') is None


@pytest.mark.parametrize('depth', [-0.1, 1.01, 'half', None, True])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r'depth must be a number in \[0, 1\]'):
        passkey_prompt(bt, 900, depth, 7)


def test_too_few_tokens():
    with pytest.raises(ValueError, match='below the template'):
        passkey_prompt(bt, 120, 0.5, 7)


def test_bad_key():
    with pytest.raises(ValueError, match='key must be'):
        passkey_prompt(bt, 900, 0.5, -1)


def test_held_out_keys_are_disjoint_from_training_keys():
    held = [draw_key(random.Random(i), True) for i in range(300)]
    train = [draw_key(random.Random(i), False) for i in range(300)]
    assert all(map(is_held_out_key, held)) and not any(map(is_held_out_key, train))
    assert all(1 <= k <= MAX_KEY for k in held + train)
    # about a quarter held out, and no last-digit pattern a model could learn
    frac = np.mean([is_held_out_key(k) for k in range(1, MAX_KEY + 1)])
    assert 0.2 < frac < 0.3
    last = np.bincount([k % 10 for k in range(1, MAX_KEY + 1) if is_held_out_key(k)], minlength=10)
    assert last.min() > 0.8 * last.mean()


def test_ruler_prompts():
    ids, ans = multikey_prompt(bt, 900, 3, seed=2)
    t = bt.decode(ids)
    assert len(ids) == 900 and t.count('The special magic number for') == 4 and f'is {ans}.' in t
    word = re.search(r'What is the special magic number for (\w+)\?', t).group(1)
    assert f'for {word} is {ans}.' in t
    ids, ans = variable_tracking_prompt(bt, 900, hops=3, seed=2)
    chain = re.findall(r'VAR (\w+) = (?:VAR )?(\w+)\.', bt.decode(ids))
    assert len(chain) == 4 and int(chain[0][1]) == ans
    assert [c[1] for c in chain[1:]] == [c[0] for c in chain[:-1]]
    with pytest.raises(ValueError, match='n_keys'): multikey_prompt(bt, 900, 0)
    with pytest.raises(ValueError, match='hops'): variable_tracking_prompt(bt, 900, hops=0)


# ---- the training mix
def test_long_documents_split_disjoint():
    tr, va = long_documents('train'), long_documents('val')
    assert tr and va and not set(tr) & set(va)
    with pytest.raises(ValueError, match="'train' or 'val'"): long_documents('test')


def test_retrieval_example_labels_only_answers():
    ids, lab = retrieval_example(bt, 'passkey', 700, random.Random(3))
    assert len(ids) == len(lab)
    tgt = [(i, t) for i, t in enumerate(lab) if t != -100]
    assert all(ids[i + 1] == t for i, t in tgt)  # labels[t] is the token at t + 1
    assert re.fullmatch(r' \d+\.', bt.decode([t for _, t in tgt]))
    ids, lab = retrieval_example(bt, 'multikey', 800, random.Random(4))
    keys = re.findall(r'\d+', bt.decode([t for t in lab if t != -100]))
    assert len(keys) >= 2 and not any(is_held_out_key(int(k)) for k in keys)
    with pytest.raises(ValueError, match='unknown retrieval task'): retrieval_example(bt, 'qa', 800, random.Random(0))


def test_mix_long_fraction_and_purity(docs):
    mix = LongMix(bt, docs, 1024, batch_size=50, synth_frac=0.0, min_len=600, answer_room=300, eos_id=bt.eos_id)
    full = torch.cat([(mix.batch(i)[1] != -100).all(1) for i in range(8)]).float().mean().item()
    assert 0.3 < full < 0.5  # 40% at the stage's length
    a, b = LongMix(bt, docs, 1024, 8, min_len=600, answer_room=300, eos_id=bt.eos_id).batch(5), \
        LongMix(bt, docs, 1024, 8, min_len=600, answer_room=300, eos_id=bt.eos_id).batch(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match=r'must be in \[0, 1\]'): LongMix(bt, docs, 1024, long_frac=2)
    with pytest.raises(ValueError, match='too short for the'): LongMix(bt, docs, 1024, min_len=200, answer_room=72)


def test_stage_schedules():
    s = two_stage(4096)
    assert [(x.seq_len, x.rope_theta) for x in s] == [(4096, 1e4), (32768, 1e6)]
    assert [x.seq_len for x in progressive(256)] == [256, 512, 1024, 2048]
    assert [x.seq_len for x in progressive(256, mult=4)] == [256, 512, 1024]
    with pytest.raises(ValueError, match='power of two'): progressive(256, mult=6)
    with pytest.raises(ValueError, match='stages only extend'):
        run_stages([Stage('a', 512, 1e4, 1), Stage('b', 256, 1e6, 1)], None, None, None, '/tmp')


# ---- exact resume of a tiny two-stage run
def _tiny_two_stage(d, docs, stop=None):
    base = small_config(bt.vocab_size, hidden_size=32, layers=1, head_dim=16, L=512)
    kw = dict(cpu_threads=1, ckpt_every=2, mix_kw=dict(tasks=('passkey', 'multikey'), min_len=480, answer_room=20))
    train_stage(base, Stage('s1', 512, 1e4, 2, batch_size=2), bt, docs, d, **kw)
    return train_stage(base, Stage('s2', 1024, 1e6, 4, batch_size=2), bt, docs, d, init_from=d / 's1',
                       stop_at_step=stop, **kw)


def test_two_stage_resumes_exactly(tmp_path, docs, one_torch_thread):
    straight = _tiny_two_stage(tmp_path / 'a', docs)
    _tiny_two_stage(tmp_path / 'b', docs, stop=2)
    resumed = _tiny_two_stage(tmp_path / 'b', docs)
    assert straight.config.rope_theta == 1e6 and straight.config.max_position_embeddings == 1024
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    s1 = QwenForCausalLM(small_config(bt.vocab_size, hidden_size=32, layers=1, head_dim=16, L=512))
    from qwen_edu.checkpoint import load_checkpoint, latest_checkpoint
    sd, state = load_checkpoint(latest_checkpoint(tmp_path / 'a' / 's2' / 'ckpt'))
    assert state['model_config']['rope_theta'] == 1e6 and state['stage']['seq_len'] == 1024


def test_stage2_needs_stage1(tmp_path, docs):
    base = small_config(bt.vocab_size, hidden_size=32, layers=1, head_dim=16, L=512)
    with pytest.raises(FileNotFoundError, match='train the previous stage first'):
        train_stage(base, Stage('s2', 1024, 1e6, 1, batch_size=2), bt, docs, tmp_path, init_from=tmp_path / 's1')


# ---- YaRN and DCA
def test_yarn_equals_transformers(short_model):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwen_edu.hf import config_to_hf
    yarn = variant_model(short_model, 256, 1024, yarn=4.0)
    hf = Qwen2ForCausalLM(Qwen2Config(**config_to_hf(yarn.config))).eval()
    hf.load_state_dict(yarn.state_dict(), strict=False)
    ids = torch.randint(0, 257, (2, 1000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = yarn(ids).logits, hf(ids).logits
        plain = variant_model(short_model, 256, 1024)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (plain - theirs).abs().max() > 1e-3  # YaRN changes the result: the comparison is not vacuous


def test_dca_equals_full_attention_inside_one_chunk(short_model):
    ids = torch.randint(0, 257, (2, 400), generator=torch.Generator().manual_seed(1))
    dca = variant_model(short_model, 256, 1024, dca=True)  # chunks of 256, local window 32: Lc = 224
    plain = variant_model(short_model, 256, 1024)
    with torch.no_grad():
        torch.testing.assert_close(dca(ids[:, :224]).logits, plain(ids[:, :224]).logits, atol=1e-5, rtol=1e-5)
        assert (dca(ids).logits - plain(ids).logits).abs().max() > 1e-5  # beyond one chunk it remaps positions


def test_chunked_prefill_generation_matches(short_model):
    from qwen_edu.generate import generate
    p = torch.randint(0, 257, (2, 600), generator=torch.Generator().manual_seed(2))
    dca, plain = variant_model(short_model, 256, 1024, dca=True), variant_model(short_model, 256, 1024)
    assert generate_long(plain, p, 4) == generate_long(plain, p, 4, prefill_chunk=100) == generate(plain, p, 4, stop_tokens=None)
    assert generate_long(dca, p, 4) == generate_long(dca, p, 4, prefill_chunk=100)
    docs = np.random.default_rng(0).integers(0, 257, 5000).astype(np.int32)
    np.testing.assert_allclose(loss_by_position(dca, docs, 512, 2, 8), loss_by_position(dca, docs, 512, 2, 8, prefill_chunk=128),
                               atol=1e-4)


def test_eval_length_beyond_scaling_is_an_error(short_model):
    plain, yarn = variant_model(short_model, 256, 2048), variant_model(short_model, 256, 2048, yarn=4.0)
    assert supported_length(plain.config, 256) == 256 and supported_length(yarn.config, 256) == 1024
    with pytest.raises(ValueError, match='beyond what this model supports'): check_eval_length(512, plain.config, 256)
    with pytest.raises(ValueError, match='beyond what this model supports'): check_eval_length(2048, yarn.config, 256)
    check_eval_length(512, plain.config, 256, extrapolate=True)
    check_eval_length(1024, yarn.config, 256)
    with pytest.raises(ValueError, match='exceeds max_position_embeddings'):
        check_eval_length(4096, yarn.config, 256, extrapolate=True)


def test_grid_rows_and_ruler(short_model):
    plain = variant_model(short_model, 256, 1024)
    g = passkey_grid({'plain': plain}, bt, 256, [300, 400], [0.0, 1.0], trials=2)
    assert g.columns.tolist() == ['variant', 'train_len', 'eval_len', 'depth', 'trials', 'accuracy']
    assert len(g) == 4 and g.accuracy.between(0, 1).all()
    assert 0 <= ruler_task(plain, bt, 'vartrack', 400, trials=2) <= 1
    with pytest.raises(ValueError, match='unknown RULER task'): ruler_task(plain, bt, 'qa', 400)
    assert kv_cache_bytes(plain.config, 1000) == 2 * 2 * 2 * 32 * 1000 * 4


def test_row_mean_loss_weighs_rows_equally(short_model):
    from qwen_edu.longctx import row_mean_loss
    x = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(3))
    y = x.roll(-1, 1).clone()
    y[1, :-1] = -100            # one target in row 1
    y[2] = -100                 # none in row 2: left out
    with torch.no_grad():
        nll = short_model(x, labels=y, shift_labels=False, loss_reduction='none').loss
        got = row_mean_loss(short_model, (x, y))
    torch.testing.assert_close(got, (nll[0].mean() + nll[1, -1]) / 2)


def test_long_prefill_takes_the_fused_causal_path(short_model, monkeypatch):
    "A long prompt prefilled at once: SDPA with is_causal and no mask; in pieces: a boolean (never float) mask."
    import torch.nn.functional as F
    calls, sdpa = [], F.scaled_dot_product_attention
    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], None if attn_mask is None else attn_mask.dtype, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    yarn = variant_model(short_model, 256, 1100, yarn=4.0)
    generate_long(yarn, torch.randint(0, 257, (1, 1024)), 2)
    assert calls[0] == (1024, None, True) and all(c[1] is None for c in calls)
    calls.clear()
    generate_long(yarn, torch.randint(0, 257, (1, 1024)), 2, prefill_chunk=256)
    pieces = [c for c in calls if c[0] == 256]
    n = yarn.config.num_hidden_layers  # one call per layer and piece; the first piece (nothing cached) takes the causal flag
    assert pieces[:n] == [(256, None, True)] * n and {c[1] for c in pieces[n:]} == {torch.bool}


def test_prompts_do_not_depend_on_the_hash_seed():
    "Evaluation prompts are the same in every process (a set's order changes with PYTHONHASHSEED)."
    import os, subprocess, sys
    code = ("from qwen_edu.data import ByteTokenizer; from qwen_edu.longctx import variable_tracking_prompt as v, "
            "multikey_prompt as m; b = ByteTokenizer(); print(v(b, 600, 3, 5)[0][:600:7], m(b, 600, 4, 5)[0][:600:7])")
    outs = {subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(s))).stdout for s in (1, 2, 3)}
    assert len(outs) == 1


def test_generation_memory_is_measured_in_a_fresh_process(short_model):
    from qwen_edu.longctx import generation_memory
    b = generation_memory(short_model, 200)
    assert isinstance(b, int) and b > 0
