"Tests of the qwen_edu.data package: shards round-trip, loader determinism, bad input, the pipeline pieces, the layout."
import hashlib, json, os
from pathlib import Path
import numpy as np
import pytest
import torch
from qwen_edu import data as D
from qwen_edu.data import shards as S


# ---------------------------------------------------------------- shards and loader
@pytest.mark.parametrize('vocab,dt', [(257, 'uint16'), (65536, 'uint16'), (65537, 'uint32'), (151665, 'uint32')])
def test_shards_round_trip(tmp_path, vocab, dt):
    rng = np.random.default_rng(vocab)
    ids = {'train': rng.integers(0, vocab, 5000), 'val': rng.integers(0, vocab, 700)}
    ids['train'][:2] = [0, vocab - 1]                                 # the extreme ids survive
    meta = D.write_shards(tmp_path, ids, vocab_size=vocab, eos_id=vocab - 1)
    assert meta['dtype'] == dt and meta['n_tokens'] == {'train': 5000, 'val': 700}
    assert json.loads((tmp_path/'meta.json').read_text())['dtype'] == dt
    for s in ids:
        mm = D.open_tokens(tmp_path, s)
        assert isinstance(mm, np.memmap) and mm.dtype == np.dtype(dt)
        np.testing.assert_array_equal(np.asarray(mm), ids[s])
        # raw little-endian layout, readable without our code
        np.testing.assert_array_equal(np.fromfile(tmp_path/f'{s}.bin', dtype='<' + np.dtype(dt).str[1:]), ids[s])


def test_pack_documents_keeps_literal_special_text_and_separates_with_eos():
    tok = D.ByteTokenizer()
    a = D.pack_documents(['x<|endoftext|>y', 'z'], tok)
    assert a.tolist() == [*b'x<|endoftext|>y', 256, *b'z', 256]
    assert (a == tok.eos_id).sum() == 2
    assert tok.encode('x<|endoftext|>y', allowed_special='all') == [120, 256, 121]   # tiktoken semantics
    assert tok.encode_batch(['x<|endoftext|>y'], allowed_special='all') == [[120, 256, 121]]  # keywords passed on
    with pytest.raises(TypeError, match='expects a str'): tok.encode(b'x')


def test_bad_vocab_for_dtype_keeps_existing_shards(tmp_path):
    ids = {'train': np.arange(1000) % 300, 'val': np.arange(100) % 300}
    D.write_shards(tmp_path, ids, vocab_size=300, eos_id=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    big = {'train': np.arange(1000) + 70000, 'val': np.arange(10)}
    with pytest.raises(ValueError, match='too large for uint16'):
        D.write_shards(tmp_path, big, vocab_size=80000, eos_id=0, dtype='uint16')
    with pytest.raises(ValueError, match='outside'):
        D.write_shards(tmp_path, big, vocab_size=300, eos_id=0)
    with pytest.raises(ValueError, match='empty'):
        D.write_shards(tmp_path, {'train': np.zeros(0, int)}, vocab_size=300, eos_id=0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # nothing lost, no temp files left


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob('*') if p.is_file()}


def test_write_shards_failure_midway_keeps_the_old_set(tmp_path, monkeypatch):
    D.write_shards(tmp_path, {'train': np.arange(100), 'val': np.arange(10)}, 1000, 0)
    before, real = _snapshot(tmp_path), S._write_temp
    def disk_full_on_val(path, fn):
        if Path(path).name == 'val.bin': raise OSError('disk full')
        return real(path, fn)
    monkeypatch.setattr(S, '_write_temp', disk_full_on_val)
    with pytest.raises(OSError, match='disk full'):
        D.write_shards(tmp_path, {'train': np.arange(200), 'val': np.arange(20)}, 1000, 0)
    assert _snapshot(tmp_path) == before                      # old train.bin kept with its val.bin and meta.json
    monkeypatch.setattr(S, '_write_temp', real)
    D.write_shards(tmp_path, {'train': np.arange(200), 'val': np.arange(20)}, 1000, 0)
    assert len(D.open_tokens(tmp_path, 'train')) == 200 and len(D.open_tokens(tmp_path, 'val')) == 20


def test_failed_rebuild_keeps_the_trained_tokenizer(tmp_path):
    kw = dict(size=100_000, quality_drop=0, near_dup_threshold=0)
    D.build_corpus(tmp_path, 300, **kw)
    before = _snapshot(tmp_path)
    assert 'tokenizer/tokenizer.json' in before
    with pytest.raises(FileNotFoundError, match='test set'):  # fails after a new (vocab 400) tokenizer was trained
        D.build_corpus(tmp_path, 400, test_sets=str(tmp_path/'missing.jsonl'), **kw)
    assert _snapshot(tmp_path) == before                      # the shards still match the tokenizer beside them


def test_open_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='build them first'):
        D.open_tokens(tmp_path/'missing', 'train')
    D.write_shards(tmp_path, {'train': np.arange(100)}, vocab_size=100, eos_id=0)
    with pytest.raises(FileNotFoundError, match="no 'val' shard"):
        D.open_tokens(tmp_path, 'val')
    with open(tmp_path/'train.bin', 'ab') as f: f.write(b'\0\0')
    with pytest.raises(ValueError, match='truncated or from another run'):
        D.open_tokens(tmp_path, 'train')


def _shards(d, vocab=300, **kw):
    rng = np.random.default_rng(0)
    ids = {'train': rng.integers(0, vocab, 4000), 'val': rng.integers(0, vocab, 500)}
    ids['train'][0] = vocab - 1
    D.write_shards(d, ids, vocab_size=vocab, eos_id=0, **kw)
    return ids


def _edit_meta(d, **changes):
    m = json.loads((d/'meta.json').read_text()); m.update(changes)
    for k, v in changes.items():
        if v is None: del m[k]
    (d/'meta.json').write_text(json.dumps(m))


def test_open_tokens_catches_size_and_dtype_edits(tmp_path):
    _shards(tmp_path)
    with open(tmp_path/'train.bin', 'ab') as f: f.write(b'\0')        # one extra byte: not a whole token
    with pytest.raises(D.ShardError, match=r"train.bin is 8001 bytes.*4000 uint16 tokens.*qwen-edu data build"):
        D.open_tokens(tmp_path, 'train')
    _shards(tmp_path)
    _edit_meta(tmp_path, dtype='uint32')                              # reinterprets the bytes: sizes disagree
    with pytest.raises(D.ShardError, match='train.bin is 8000 bytes but meta.json says 4000 uint32'):
        D.open_tokens(tmp_path, 'train')
    _edit_meta(tmp_path, dtype='uint32', n_tokens={'train': 2000, 'val': 250})   # ...even with matching counts
    with pytest.raises(D.ShardError, match='holds token id .* vocab_size is 300'):
        D.open_tokens(tmp_path, 'train')
    _edit_meta(tmp_path, dtype='float32')
    with pytest.raises(D.ShardError, match="dtype 'float32' is not one of"):
        D.open_tokens(tmp_path, 'train')
    _shards(tmp_path)
    (tmp_path/'test.bin').write_bytes(b'\0' * 10)                     # a stray split that meta.json does not list
    with pytest.raises(D.ShardError, match="test.bin is not listed in"):
        D.open_tokens(tmp_path, 'test')


def test_open_tokens_verifies_sha256_once_and_again_after_a_change(tmp_path, monkeypatch):
    ids = _shards(tmp_path)
    calls, real = [], S._scan_shard
    monkeypatch.setattr(S, '_scan_shard', lambda p, dt, **kw: calls.append(Path(p).name) or real(p, dt, **kw))
    np.testing.assert_array_equal(D.open_tokens(tmp_path, 'train'), ids['train'])
    assert calls == []                                                # write_shards already recorded its hashes
    (tmp_path/'.verified.json').unlink()
    for _ in range(3): D.open_tokens(tmp_path, 'train'); D.open_tokens(tmp_path, 'val')
    assert calls == ['train.bin', 'val.bin']                          # hashed once per shard, then trusted
    b = bytearray((tmp_path/'train.bin').read_bytes()); b[100] ^= 1   # same size, one bit flipped
    (tmp_path/'train.bin').write_bytes(bytes(b))
    with pytest.raises(D.ShardError, match=r"train.bin does not match the sha256 in .*meta.json.*qwen-edu data build"):
        D.open_tokens(tmp_path, 'train')
    assert calls[-1] == 'train.bin'
    with pytest.raises(D.ShardError, match='sha256'):                 # and stays detected
        D.open_tokens(tmp_path, 'train')
    D.open_tokens(tmp_path, 'val')                                    # the untouched split still opens unhashed
    assert calls.count('val.bin') == 1


def test_open_tokens_without_a_writable_dir_still_verifies(tmp_path, monkeypatch):
    ids = _shards(tmp_path)
    (tmp_path/'.verified.json').unlink()
    monkeypatch.setattr(S, '_stamp_paths', lambda d: [Path('/proc/no/such/dir/.verified.json')])
    np.testing.assert_array_equal(D.open_tokens(tmp_path, 'val'), ids['val'])   # no stamp written: hashed every time


def test_read_meta_errors(tmp_path):
    _shards(tmp_path)
    good = (tmp_path/'meta.json').read_text()
    (tmp_path/'meta.json').write_text(good[:-20])
    with pytest.raises(D.ShardError, match=r"meta.json is not valid JSON.*qwen-edu data build"):
        D.read_meta(tmp_path)
    (tmp_path/'meta.json').write_text('[1, 2]')
    with pytest.raises(D.ShardError, match='not a JSON object'):
        D.read_meta(tmp_path)
    (tmp_path/'meta.json').write_text(good); _edit_meta(tmp_path, dtype=None, sha256=None)
    with pytest.raises(D.ShardError, match=r"meta.json lacks \['dtype', 'sha256'\]"):
        D.open_tokens(tmp_path, 'train')
    (tmp_path/'meta.json').write_text(good); _edit_meta(tmp_path, vocab_size=70000)
    with pytest.raises(D.ShardError, match='uint16 cannot hold'):
        D.read_meta(tmp_path)
    (tmp_path/'meta.json').write_text(good); _edit_meta(tmp_path, n_tokens={'train': -1, 'val': 500})
    with pytest.raises(D.ShardError, match=r"n_tokens\['train'\]"):
        D.read_meta(tmp_path)


def test_vocab_size_too_small_for_the_ids(tmp_path):
    _shards(tmp_path)
    good = (tmp_path/'meta.json').read_text()
    _edit_meta(tmp_path, vocab_size=200)                              # the recorded max id (299) no longer fits
    with pytest.raises(D.ShardError, match=r"max_id\['train'\] = 299 >= vocab_size 200"):
        D.read_meta(tmp_path)
    _edit_meta(tmp_path, max_id=None)                                 # an old meta.json without max_id: the scan catches it
    with pytest.raises(D.ShardError, match='holds token id 299 but meta.json says vocab_size is 200'):
        D.open_tokens(tmp_path, 'train')
    (tmp_path/'.verified.json').unlink()
    with pytest.raises(D.ShardError, match='holds token id 299'):
        D.open_tokens(tmp_path, 'train')
    (tmp_path/'meta.json').write_text(good); _edit_meta(tmp_path, max_id=None)
    assert len(D.open_tokens(tmp_path, 'train')) == 4000              # old meta.json files still open


def test_empty_val_split(tmp_path):
    _shards(tmp_path)
    (tmp_path/'val.bin').write_bytes(b'')
    m = json.loads((tmp_path/'meta.json').read_text())
    _edit_meta(tmp_path, n_tokens={**m['n_tokens'], 'val': 0}, sha256={**m['sha256'], 'val': hashlib.sha256(b'').hexdigest()})
    with pytest.raises(D.ShardError, match="val.bin holds no tokens: training cannot validate"):
        D.open_tokens(tmp_path, 'val')


def test_tokenizer_larger_than_meta_vocab(tmp_path):
    from qwen_edu.tokenizer import BPETokenizer
    tok = BPETokenizer.train('some text to learn from ' * 20, 300, special_tokens=['<|endoftext|>'])
    tok.save_hf(tmp_path/'tok'); V = tok.vocab_size
    D.write_shards(tmp_path, {'train': np.arange(V - 20), 'val': np.arange(20)}, vocab_size=V, eos_id=tok.eos_id,
                   tokenizer_path=tmp_path/'tok')
    assert len(D.open_tokens(tmp_path, 'train')) == V - 20
    _edit_meta(tmp_path, vocab_size=V - 10, max_id=None, eos_id=0)            # ids still fit, the tokenizer's do not
    with pytest.raises(D.ShardError, match=rf"tokenizer .*tok has {V} ids but meta.json says vocab_size is {V - 10}"):
        D.open_tokens(tmp_path, 'train')
    _edit_meta(tmp_path, vocab_size=V, eos_id=5)
    with pytest.raises(D.ShardError, match=r"eos_id 5 is not the tokenizer's <\|endoftext\|> id"):
        D.open_tokens(tmp_path, 'train')


def test_random_batches_pure_and_shifted():
    toks = np.arange(10_000, dtype=np.uint16)
    rb = D.RandomBatches(toks, batch_size=8, seq_len=32, seed=5)
    x, y = rb.batch(7)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(D.RandomBatches(toks, 8, 32, seed=5).batch(7)[0], x)   # fresh object, same batch
    assert not torch.equal(D.RandomBatches(toks, 8, 32, seed=6).batch(7)[0], x)
    assert not torch.equal(rb.batch(8)[0], x)
    # windows reach the last token and never run past the end
    starts = np.concatenate([rb.starts(i) for i in range(2000)])
    assert starts.min() >= 0 and starts.max() == len(toks) - 33


def test_random_batches_accumulation_equals_data_parallel():
    "1 process x grad_accum 2 sees the same sequences per step as 2 ranks x grad_accum 1."
    toks = np.arange(5000)
    rb = D.RandomBatches(toks, 2, 8, seed=0)
    for step in range(3):
        one = [rb.batch((step * 2 + m) * 1 + 0)[0] for m in range(2)]
        two = [rb.batch((step * 1 + 0) * 2 + r)[0] for r in range(2)]
        assert torch.equal(torch.cat(one), torch.cat(two))


def test_random_batches_too_short():
    with pytest.raises(ValueError, match='shorter seq_len'):
        D.RandomBatches(np.arange(10), 2, 10)


# ---------------------------------------------------------------- decontamination
import itertools, random, subprocess, sys
from pathlib import Path


def _lcs_brute(a, b):
    "Longest common subsequence by trying every subsequence of the shorter one (tiny inputs only)."
    if len(a) > len(b): a, b = b, a
    def is_subseq(s, t):
        it = iter(t); return all(x in it for x in s)
    for k in range(len(a), -1, -1):
        if any(is_subseq(c, b) for c in itertools.combinations(a, k)): return k


def test_lcs_matches_brute_force_and_is_symmetric():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 3, rng.integers(0, 9)), rng.integers(0, 3, rng.integers(0, 12))
        l = D.lcs_length(a, b)
        assert l == _lcs_brute(list(a), list(b)) == D.lcs_length(b, a)
    assert D.lcs_length(list(b"ABCBDAB"), list(b"BDCABA")) == 4


def test_rule_thresholds_exactly():
    base = list(range(100, 200))
    item = base[:20]                                              # |s_e| = 20 -> needs LCS >= 13 (0.6*20 = 12)
    def with_lcs(k):                                              # a 40-token training seq sharing exactly k tokens
        return item[:k] + list(range(1000, 1040 - k))
    assert D.lcs_length(with_lcs(13), item) == 13
    assert D.is_contaminated(with_lcs(13), item) and not D.is_contaminated(with_lcs(12), item)
    item30 = base[:30]                                            # |s_e| = 30 -> needs LCS >= 18 (0.6*30)
    assert D.is_contaminated(item30[:18] + [1] * 30, item30) and not D.is_contaminated(item30[:17] + [1] * 30, item30)
    short = base[:12]                                             # shorter than 13: can never trigger
    assert not D.is_contaminated(short * 3, short)
    assert D.decontaminate([short * 3], [short])[0] == []


def _plant(rng, n_train=60, n_test=30, L=40, V=5000):
    train = [list(rng.integers(0, V, rng.integers(200, 600))) for _ in range(n_train)]
    tests = [list(rng.integers(0, V, L)) for _ in range(n_test)]
    verb, light, heavy = [0, 1, 2], [3, 4, 5], [6, 7, 8]
    for k, i in enumerate(verb + light + heavy):
        item = list(tests[k])
        if i in light: item[10] = item[25] = V + 1                              # 2 edits: a >= 8-run survives
        if i in heavy: item = [t if n % 4 != 3 else V + 2 for n, t in enumerate(item)]   # runs of 3, LCS 75%
        train[i] = train[i][:100] + item + train[i][100:]
    return train, tests, verb + light + heavy


def test_decontaminate_catches_planted_spares_clean():
    train, tests, planted = _plant(np.random.default_rng(1))
    drop_bag, hits, _ = D.decontaminate(train, tests, prefilter='bag')
    assert drop_bag == planted
    assert all(j == i for i, j, l in hits)                        # each doc flagged by the item planted in it
    drop_all, _, _ = D.decontaminate(train, tests, prefilter='none')
    assert drop_all == planted                                    # the exact rule on every pair agrees
    drop_ng, _, st = D.decontaminate(train, tests, prefilter='ngram', ngram=8)
    assert drop_ng == planted[:6]                                 # the cheap filter misses only the scattered copies
    assert st['candidates'] < 0.05 * st['windows'] * len(tests)  # and checks few pairs
    drop_1, _, _ = D.decontaminate(train, tests, prefilter='ngram', ngram=1)
    assert drop_1 == planted                                      # with n = 1 the n-gram filter is the bag filter's superset


def test_decontaminate_bad_args():
    with pytest.raises(ValueError, match='ngram must be'):
        D.decontaminate([[1] * 20], [[1] * 20], ngram=14)
    with pytest.raises(ValueError, match='prefilter'):
        D.decontaminate([[1] * 20], [[1] * 20], prefilter='fast')


# ---------------------------------------------------------------- quality
def test_ngram_lm_is_normalised_and_prefers_its_training_text():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 10, 200)) for _ in range(3)] + [[1, 2, 3, 4] * 50]
    lm = D.NgramLM(30, order=3).fit(seqs)
    for hist in ([1, 2], [29, 28], []):
        p = sum(np.exp(lm.token_logprobs(hist + [w])[-1]) for w in range(30))
        assert abs(p - 1) < 1e-9
    assert lm.nll([1, 2, 3, 4] * 10) < lm.nll(list(rng.integers(10, 30, 40)))
    with pytest.raises(ValueError, match='no tokens'):
        D.NgramLM(30).fit([[], []])


def test_perplexity_score_equals_model_loss():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from qwen_edu.config import QwenConfig
    from qwen_edu.model import QwenForCausalLM
    tok = D.ByteTokenizer()
    torch.manual_seed(0)
    kw = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    texts = ['short one', 'a somewhat longer document about nothing in particular', 'x' * 80]
    for model in (Qwen2ForCausalLM(Qwen2Config(**kw)), QwenForCausalLM(QwenConfig.from_preset('edu-tiny', **kw))):
        s = D.perplexity_score(texts, model, tok, max_len=50, batch_size=2)   # batches mix lengths: padding must not leak
        for t, v in zip(texts, s):
            ids = torch.tensor([[tok.eos_id] + tok.encode(t)[:50]])
            assert abs(v - model(ids, labels=ids).loss.item()) < 1e-4


def test_heuristics_and_quality_filter():
    good = D.prose_documents(50_000)[3]['text']
    assert D.heuristic_reasons(good) == []
    assert 'repeated_lines' in D.heuristic_reasons('Subscribe to our newsletter now!\n' * 30)
    assert 'symbols' in D.heuristic_reasons('#$%&*@!~^{}[]<>| ' * 60)
    assert 'too_short' in D.heuristic_reasons('hello world')
    docs = [dict(text=str(i), domain='a' if i < 10 else 'b') for i in range(20)]
    kept, dropped = D.quality_filter(docs, np.arange(20.), drop_fraction=0.2)
    assert [d['text'] for d in dropped] == ['8', '9', '18', '19']   # worst 20% of each domain
    with pytest.raises(ValueError, match='drop_fraction'):
        D.quality_filter(docs, np.arange(20.), drop_fraction=1.0)


# ---------------------------------------------------------------- dedup, classifier, mixture
def test_minhash_estimates_jaccard_and_near_dedup():
    text = D.prose_documents(100_000)[0]['text']
    w = text.split()
    r = random.Random(0)
    for k in (2, 20, 60):
        pos = set(r.sample(range(len(w)), k)); other = ' '.join('Z' if i in pos else x for i, x in enumerate(w))
        est = (D.MinHasher(256).signature(text) == D.MinHasher(256).signature(other)).mean()
        assert abs(est - D.jaccard(text, other)) < 0.1
    docs = D.prose_documents(300_000)
    near = dict(docs[5], text=docs[5]['text'].replace(' the ', ' a ', 1))
    exact = dict(docs[7], text='  ' + docs[7]['text'].replace('\n', '\n\n') + ' ')
    base_k, base_d = D.exact_dedup(docs)                        # pydoc repeats a few tables itself
    k1, d1 = D.exact_dedup(docs + [exact, near])
    assert d1 == base_d + [exact]
    base_n = len(D.near_dedup(base_k)[1])
    k2, d2 = D.near_dedup(k1)
    assert near in d2 and docs[5] in k2 and len(d2) == base_n + 1


def test_domain_classifier_and_mixture():
    docs = D.builtin_documents(600_000, seed=1)
    r = random.Random(0); r.shuffle(docs)
    clf = D.DomainClassifier().fit([d['text'] for d in docs[::2]], [d['domain'] for d in docs[::2]])
    pred = clf.predict([d['text'] for d in docs[1::2]])
    assert np.mean([p == d['domain'] for p, d in zip(pred, docs[1::2])]) > 0.95
    w = {'code': 0.2, 'prose': 0.5, 'math': 0.3}
    mixed, rep = D.mix_domains(docs, w, seed=0)
    tot = sum(rep['after'].values())
    for k, v in w.items(): assert abs(rep['after'][k] / tot - v) < 0.05
    assert abs(tot / sum(rep['before'].values()) - 1) < 0.1
    assert D.mix_domains(docs, w, seed=0)[0] == mixed
    with pytest.raises(ValueError, match="none of them"):
        D.mix_domains(docs, {'code': 1, 'poetry': 1})
    with pytest.raises(ValueError, match='non-negative'):
        D.mix_domains(docs, {'code': -1})


def test_math_is_deterministic_and_correct():
    assert D.math_documents(30_000, seed=3) == D.math_documents(30_000, seed=3)
    r = random.Random(0)
    for _ in range(300):
        p, s, a = D.math_problem(r)
        if p.startswith('Compute') and '+' in p and '/' not in p:
            x, y = map(int, re.findall(r'\d+', p)); assert int(a) == x + y
        if p.startswith('Compute') and ' x ' in p:
            x, y = map(int, re.findall(r'\d+', p)); assert int(a) == x * y
        if p.startswith('Solve'):
            c, b, rhs = re.fullmatch(r'Solve (-?\d+)x ([+-] \d+) = (-?\d+) for x\.', p).groups()
            assert int(c) * int(a) + int(b.replace(' ', '')) == int(rhs)


import re


# ---------------------------------------------------------------- sources and bad input
def test_local_sources(tmp_path):
    (tmp_path/'a.jsonl').write_text('\n'.join(json.dumps({'text': f'doc {i}', 'x': 1}) for i in range(7)))
    assert [d['text'] for d in D.hf_documents(tmp_path/'a.jsonl')] == [f'doc {i}' for i in range(7)]
    assert len(D.hf_documents(tmp_path/'a.jsonl', max_docs=3)) == 3
    with pytest.raises(ValueError, match="no field 'body'"):
        D.hf_documents(tmp_path/'a.jsonl', text_field='body')
    (tmp_path/'t').mkdir(); (tmp_path/'t'/'x.txt').write_text('para one\n\npara two\n')
    assert [d['text'].strip() for d in D.hf_documents(tmp_path/'t')] == ['para one', 'para two']
    import pandas as pd
    pd.DataFrame({'text': ['p1', 'p2']}).to_parquet(tmp_path/'b.parquet')
    assert [d['text'] for d in D.hf_documents(tmp_path/'b.parquet')] == ['p1', 'p2']
    with pytest.raises(FileNotFoundError, match='does not exist'):
        D.hf_documents(str(tmp_path/'nope.jsonl'))


def test_non_utf8_local_sources(tmp_path):
    (tmp_path/'bad.txt').write_bytes(b'hello world\n\ncaf\xe9 au lait\n')
    (tmp_path/'bad.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8: byte 16 \(line 3\).*encoding_errors='replace'"):
        D.hf_documents(tmp_path/'bad.txt')
    with pytest.raises(ValueError, match=r"bad.jsonl is not valid UTF-8: byte 28 \(line 2\)"):
        D.hf_documents(tmp_path/'bad.jsonl')
    (tmp_path/'dir').mkdir(); (tmp_path/'dir'/'a.txt').write_text('fine\n'); (tmp_path/'dir'/'b.txt').write_bytes(b'x' * 5000 + b'\xff')
    with pytest.raises(ValueError, match=r"b.txt is not valid UTF-8: byte 5000 \(line 1\)"):
        D.hf_documents(tmp_path/'dir')
    assert [d['text'] for d in D.hf_documents(tmp_path/'bad.txt', encoding_errors='replace')][1].startswith('caf\ufffd')
    assert D.hf_documents(tmp_path/'bad.jsonl', encoding_errors='replace')[1]['text'] == 'caf\ufffd'
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8: byte 16"):
        D.load_test_texts(str(tmp_path/'bad.txt'))
    with pytest.raises(ValueError, match='encoding_errors'):
        D.hf_documents(tmp_path/'bad.txt', encoding_errors='loose')
    docs = [d['text'] for d in D.prose_documents(40_000)[:8]]
    (tmp_path/'l1.jsonl').write_bytes(b'\n'.join(json.dumps({'text': 'Caf\xe9 ' + t}, ensure_ascii=False).encode('latin-1', 'replace')
                                               for t in docs))
    with pytest.raises(ValueError, match=r'l1.jsonl is not valid UTF-8: byte 13 \(line 1\)'):
        D.data_cli(['build', str(tmp_path/'s'), '--source', str(tmp_path/'l1.jsonl'), '--tokenizer', 'bytes'])
    assert D.data_cli(['build', str(tmp_path/'s'), '--source', str(tmp_path/'l1.jsonl'), '--tokenizer', 'bytes',
                       '--encoding-errors', 'replace']) == 0


def test_unfetchable_dataset_says_what_to_do():
    code = ("from qwen_edu.data import hf_documents\n"
            "try: hf_documents('roneneldan/TinyStories', max_docs=1)\n"
            "except ConnectionError as e: print('MSG', e)\n")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert 'MSG' in out and 'no network' in out and 'HF_DATASETS_OFFLINE' in out and 'local path' in out


# ---------------------------------------------------------------- the pipeline
def _split_docs(a, eos):
    cuts = np.nonzero(a == eos)[0]
    return [a[s + 1 if k else 0:e] for k, (s, e) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def test_build_corpus_round_trip_and_reproducible(tmp_path):
    tok = D.ByteTokenizer()
    (tmp_path/'extra.jsonl').write_text('\n'.join(json.dumps({'text': f'A story <|endoftext|> about the number {i}. ' * 20})
                                                  for i in range(5)))
    kw = dict(sources=['builtin', str(tmp_path/'extra.jsonl')], size=200_000, mixture={'code': 1, 'prose': 1, 'math': 1})
    man = D.build_corpus(tmp_path/'a', tok, **kw)
    texts = set()
    for s in ('train', 'val'):
        a = np.asarray(D.open_tokens(tmp_path/'a', s))
        assert a[-1] == tok.eos_id and man['shards']['n_tokens'][s] == len(a)
        pieces = _split_docs(a, tok.eos_id)
        for p in pieces: assert tok.encode(tok.decode(p.tolist())) == p.tolist()       # round trip to the same tokens
        texts |= {tok.decode(p.tolist()) for p in pieces}
    assert any('<|endoftext|> about the number' in t for t in texts)                # literal special text kept as text
    val = [json.loads(l) for l in (tmp_path/'a'/'val.jsonl').read_text().splitlines()]   # the val split as text:
    assert len(val) == man['documents']['val'] and all(v['domain'] in ('code', 'prose', 'math') for v in val)
    assert [tok.decode(p.tolist()) for p in _split_docs(np.asarray(D.open_tokens(tmp_path/'a', 'val')), tok.eos_id)] == \
        [v['text'] for v in val]                                                       # exactly the documents of val.bin
    man2 = D.build_corpus(tmp_path/'b', tok, **kw)
    assert man2['shards']['sha256'] == man['shards']['sha256']                       # same inputs, same bytes
    assert man2['sources'] == man['sources'] and all(len(s['sha256']) == 64 for s in man['sources'])
    m = json.loads((tmp_path/'a'/'manifest.json').read_text())
    assert set(m['steps']) >= {'loaded', 'heuristics', 'exact_dedup', 'near_dedup', 'quality', 'mixture', 'domain_classifier'}


def test_build_corpus_decontaminates(tmp_path):
    from qwen_edu.tokenizer import BPETokenizer
    docs = D.builtin_documents(300_000)
    tok = BPETokenizer.train([d['text'] for d in docs], 1024, special_tokens=['<|endoftext|>'])
    items = [p for d in D.prose_documents(400_000, seed=5)[-40:] for p in d['text'].split('\n\n') if len(p) > 300][:10]
    (tmp_path/'leak.jsonl').write_text('\n'.join(json.dumps({'text': 'Copied:\n\n' + p + '\n\nThe end of the copied notes here.'})
                                                 for p in items[:4]))
    man = D.build_corpus(tmp_path/'out', tok, sources=['builtin', str(tmp_path/'leak.jsonl')], size=300_000,
                         test_sets={'bench': items}, quality_drop=0)
    leaked = [h for h in man['steps']['decontamination']['hits'] if h['doc'].startswith('file:')]
    assert sorted(h['test_item'] for h in leaked) == [0, 1, 2, 3]
    text = tok.decode(np.asarray(D.open_tokens(tmp_path/'out', 'train')).tolist())
    assert not any(p[:80] in text for p in items)


def test_build_corpus_bad_input_keeps_existing(tmp_path):
    tok = D.ByteTokenizer()
    D.build_corpus(tmp_path, tok, size=100_000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    class Big(D.ByteTokenizer): vocab_size = 151665
    with pytest.raises(ValueError, match='too large for uint16'):
        D.build_corpus(tmp_path, Big(), size=100_000, dtype='uint16')
    (tmp_path/'empty.jsonl').write_text(json.dumps({'text': '   '}) + '\n')
    with pytest.raises(ValueError, match='corpus is empty'):
        D.build_corpus(tmp_path, tok, sources=[str(tmp_path/'empty.jsonl')])
    with pytest.raises(FileNotFoundError, match='does not exist'):
        D.build_corpus(tmp_path, tok, sources=['./no/such/dir/data.parquet'])
    with pytest.raises(FileNotFoundError, match='test set'):
        D.build_corpus(tmp_path, tok, size=100_000, test_sets=str(tmp_path/'missing.jsonl'))
    with pytest.raises(ValueError, match='all documents were removed'):
        D.build_corpus(tmp_path, tok, sources=[str(tmp_path/'empty.jsonl'), 'builtin:math'], size=20_000,
                       heuristics=dict(min_chars=10**9))
    (tmp_path/'empty.jsonl').unlink()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before


def test_load_tokenizer_accepts_the_files_save_hf_writes(tmp_path):
    from qwen_edu.tokenizer import BPETokenizer
    ref = BPETokenizer.train('some text to learn from ' * 20, 300, special_tokens=['<|endoftext|>'])
    ref.save_hf(tmp_path/'t')
    for spec in (tmp_path/'t', tmp_path/'t'/'tokenizer.json'):   # a tokenizer.json file used to be read as .tiktoken
        tok, p = D.load_tokenizer(str(spec))
        assert p == spec and tok.vocab_size == ref.vocab_size and tok.encode('some text') == ref.encode('some text')
    with pytest.raises(FileNotFoundError, match='not found'): D.load_tokenizer(str(tmp_path/'nope'))


def test_data_cli(tmp_path, capsys):
    assert D.data_cli(['build', str(tmp_path/'s'), '--size', '150K', '--vocab-size', '600']) == 0
    meta = D.read_meta(tmp_path/'s')
    assert meta['vocab_size'] == 600 and meta['dtype'] == 'uint16' and Path(meta['tokenizer']).exists()
    from qwen_edu.tokenizer import BPETokenizer
    tok = BPETokenizer.from_hf(meta['tokenizer'])
    assert tok.vocab_size == 600 and tok.eos_id == meta['eos_id']
    assert D.data_cli(['info', str(tmp_path/'s')]) == 0
    out = capsys.readouterr().out
    assert '"n_tokens"' in out and 'val.bin: ' in out and 'tokens, verified' in out   # info opens (verifies) each split
    assert D.parse_size('4M') == 4_000_000 and D.parse_size('500k') == 500_000
    with pytest.raises(ValueError, match="like 4000000"):
        D.parse_size('lots')


# ---------------------------------------------------------------- the package layout
_MODULES = ('shards', 'sources', 'quality', 'dedup', 'decontam')


def test_every_public_name_is_importable_from_the_package():
    "`from qwen_edu.data import X` works for every public name of every module (and is the same object)."
    import importlib
    for m in _MODULES:
        mod = importlib.import_module(f'qwen_edu.data.{m}')
        assert mod.__all__, m
        for n in mod.__all__:
            assert n in D.__all__ and getattr(D, n) is getattr(mod, n), (m, n)
    for n in ('build_corpus', 'data_cli', 'load_tokenizer', 'prepare_builtin_data', 'train_builtin_tokenizer'):
        assert n in D.__all__ and callable(getattr(D, n))
    assert not (Path(D.__file__).parent.parent / 'data.py').exists()   # the old single module is gone


def test_data_modules_import_in_one_direction():
    "shards imports none of its siblings; sources/quality/dedup/decontam import at most shards; nothing imports upward."
    import ast
    pkg = Path(D.__file__).parent
    allowed = {'shards': set(), **{m: {'shards'} for m in _MODULES[1:]}}
    for m, ok in allowed.items():
        tree = ast.parse((pkg / f'{m}.py').read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = ('.' * node.level) + (node.module or '')
                if name.startswith('.') and not name.startswith('..'): used.add(name.lstrip('.') or '__init__')
                elif name.startswith('qwen_edu.data'): used.add(name[len('qwen_edu.data.'):] or '__init__')
                elif name.startswith('..') or name.startswith('qwen_edu'):   # the rest of qwen_edu: only lower layers
                    assert name.lstrip('.').replace('qwen_edu.', '') in ('tokenizer', ''), (m, name)
        assert used <= ok, f"qwen_edu/data/{m}.py imports {used - ok}"


def test_data_package_imports_nothing_above_it():
    "A fresh interpreter importing qwen_edu.data loads no training, pipeline or model module."
    import subprocess, sys
    code = ("import sys, qwen_edu.data\n"
            "print(sorted(m for m in sys.modules if m.startswith('qwen_edu.') and not m.startswith('qwen_edu.data')))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]', r.stdout


# ---------------------------------------------------------------- the built-in data, prepared once
def test_train_builtin_tokenizer_agrees_with_tokenizers(tmp_path):
    "The saved tokenizer.json loads in HF `tokenizers` and encodes exactly as ours; the figures match the pipeline's."
    from tokenizers import Tokenizer
    from qwen_edu.tokenizer import BPETokenizer, QWEN_SPECIAL_TOKENS
    res = D.train_builtin_tokenizer(tmp_path / 'tok', vocab_size=400, corpus_size=150_000, seed=1)
    assert set(res) == {'tokenizer', 'vocab_size', 'corpus_bytes', 'bytes_per_token_sample'}
    assert res['vocab_size'] == 400 and Path(res['tokenizer']).is_absolute() and 140_000 < res['corpus_bytes'] < 170_000
    ours = BPETokenizer.from_hf(res['tokenizer'])
    hf = Tokenizer.from_file(str(Path(res['tokenizer']) / 'tokenizer.json'))
    assert ours.eos_id == 400 - len(QWEN_SPECIAL_TOKENS) == hf.token_to_id('<|endoftext|>')
    for text in ['def f(x):\n    return x + 1\n', 'Solve 3x + 4 = 10. Answer: 2', 'héllo wörld 你好 <|im_start|>']:
        assert hf.encode(text).ids == ours.encode(text, allowed_special='all'), text
    with pytest.raises(ValueError, match='above 278'): D.train_builtin_tokenizer(tmp_path / 't2', vocab_size=200)
    with pytest.raises(ValueError, match='above 278'): D.train_builtin_tokenizer(tmp_path / 't2', vocab_size='8192')


def test_prepare_builtin_data_builds_once(tmp_path, monkeypatch):
    import time
    calls, real = [], D.build_corpus
    monkeypatch.setattr(D, 'build_corpus', lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    kw = dict(vocab_size=400, corpus_size=150_000, seed=0)
    d = D.prepare_builtin_data(tmp_path / 'b', **kw)
    assert d == tmp_path / 'b' / 'data' and len(calls) == 1
    meta = D.read_meta(d)
    assert meta['vocab_size'] == 400 and Path(meta['tokenizer']) == (tmp_path / 'b' / 'tokenizer').resolve()
    assert len(D.open_tokens(d, 'train')) > 10_000 and len(D.open_tokens(d, 'val')) > 0
    stamp = json.loads((tmp_path / 'b' / 'built.json').read_text())
    assert stamp['params'] == dict(vocab_size=400, corpus_size=150_000, seed=0)
    t0 = time.perf_counter()
    assert D.prepare_builtin_data(tmp_path / 'b', vocab_size=400, corpus_size='150K') == d
    assert time.perf_counter() - t0 < 0.5 and len(calls) == 1           # found, not rebuilt
    with pytest.raises(ValueError, match='pass another root, or delete'):
        D.prepare_builtin_data(tmp_path / 'b', vocab_size=512, corpus_size=150_000)
    # a build cut before its stamp (here: the stamp removed, shards left) is built again, and the stamp comes last
    (tmp_path / 'b' / 'built.json').unlink()
    assert D.prepare_builtin_data(tmp_path / 'b', **kw) == d and len(calls) == 2
    (d / 'meta.json').unlink()                                          # stamped but the shards deleted: rebuilt
    assert D.prepare_builtin_data(tmp_path / 'b', **kw) == d and len(calls) == 3 and D.read_meta(d)['vocab_size'] == 400


def test_prepare_builtin_data_concurrent_callers_build_once(tmp_path):
    "Two processes asking at once (two torchrun ranks): one builds, the other waits for it; both get the shards."
    import subprocess, sys
    code = ("import sys, qwen_edu.data as D\n"
            "calls = []; real = D.build_corpus\n"
            "D.build_corpus = lambda *a, **kw: calls.append(1) or real(*a, **kw)\n"
            "d = D.prepare_builtin_data(sys.argv[1], vocab_size=400, corpus_size=120_000)\n"
            "print(len(calls), len(D.open_tokens(d, 'train')))\n")
    env = dict(os.environ, OMP_NUM_THREADS='1')
    ps = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'b')], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert all(p.returncode == 0 for p in ps), [e[-2000:] for _, e in outs]
    res = [tuple(map(int, o.split())) for o, _ in outs]
    assert sorted(r[0] for r in res) == [0, 1] and res[0][1] == res[1][1] > 0
