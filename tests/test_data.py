"Tests of qwen_edu.data: shards round-trip, loader determinism, bad input, and the pipeline pieces."
import json, os
import numpy as np
import pytest
import torch
from qwen_edu import data as D


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


def test_open_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='build them first'):
        D.open_tokens(tmp_path/'missing', 'train')
    D.write_shards(tmp_path, {'train': np.arange(100)}, vocab_size=100, eos_id=0)
    with pytest.raises(FileNotFoundError, match="no 'val' shard"):
        D.open_tokens(tmp_path, 'val')
    with open(tmp_path/'train.bin', 'ab') as f: f.write(b'\0\0')
    with pytest.raises(ValueError, match='truncated or from another run'):
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
