"""Tokenizer benchmark: qwen_edu.tokenizer against tiktoken and Hugging Face tokenizers, in the same run.

    python bench/bench_tokenizer.py [--mb 10] [--repeats 5] [--out bench/results_tokenizer.md]

1. Encoding throughput with the real Qwen2.5 vocabulary (qwen.tiktoken) on ~10 MB of Python standard-library
   source, single thread: ours with an empty pre-token cache ("cold", a fresh tokenizer each repeat) and with the
   cache filled by a previous call ("warm"), tiktoken `encode_ordinary`, and `tokenizers` (same vocabulary written
   by `save_hf`, RAYON_NUM_THREADS=1). All outputs are checked identical.
2. BPE training to vocab 8,192 on the same text: ours (pre-token counting + numba merges, one thread) against
   `tokenizers`' BpeTrainer with the same normalizer / pre-tokenizer, run in subprocesses with RAYON_NUM_THREADS=1
   and 2 (the variable must be set before `tokenizers` is imported).
3. The fast trainer's merges equal the slow reference's on a sample small enough for the reference.
4. Long pre-tokens (the heap BPE): 1 MB inputs that are one pre-token each ('a' * 10**6, random CJK, random ASCII
   letters) or random text without whitespace (Latin-1 "bytes-like", printable ASCII, any assigned code point), ours with an empty cache every
   repeat against tiktoken `encode_ordinary`; plus the old rescan on 40,000 'a' for scale. Identical ids checked.
Repeats are interleaved; medians are reported. `--sections` runs a subset (the report then holds only those).
"""
import os
os.environ.setdefault('RAYON_NUM_THREADS', '1')
os.environ.setdefault('NUMBA_NUM_THREADS', '1')
import argparse, json, platform, statistics, subprocess, sys, tempfile, time, unicodedata
from pathlib import Path

import random
from qwen_edu.tokenizer import (BPETokenizer, PATTERN, QWEN_SPECIAL_TOKENS, _SAFE_CUT, bpe_encode_words, count_pretokens,
                                split_pretokens, stdlib_corpus, train_bpe_fast, train_bpe_slow)

HF_TRAIN = r'''
import json, sys, time
from tokenizers import Tokenizer, Regex, models, normalizers, pre_tokenizers, decoders, trainers
sys.path.insert(0, {root!r})
chunks = json.load(open({chunks!r}))
tok = Tokenizer(models.BPE())
tok.normalizer = normalizers.NFC()
tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex({pattern!r}), behavior='isolated'),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size={vocab}, show_progress=False, min_frequency=0,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
t0 = time.perf_counter(); tok.train_from_iterator(chunks, trainer=trainer); dt = time.perf_counter() - t0
v = tok.get_vocab()
print(json.dumps({{'time': dt, 'vocab': len(v), 'tokens': sorted(v)}}))
'''


def safe_chunks(text: str, size: int = 20_000) -> list[str]:
    "Cut `text` into ~size pieces at points where no pre-token can cross (newline followed by non-space)."
    out, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + size)
        end = len(text) if m is None else m.end()
        out.append(text[start:end]); start = end
    return out


def hf_train(chunks_path, vocab, threads):
    code = HF_TRAIN.format(root=str(Path(__file__).parents[1]), chunks=str(chunks_path), pattern=PATTERN, vocab=vocab)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def timed(f):
    t0 = time.perf_counter(); r = f(); return time.perf_counter() - t0, r


def timed_cpu(f):
    "(wall seconds, CPU seconds of this process, result): on a shared machine CPU time is what the code itself cost."
    t0, c0 = time.perf_counter(), time.process_time(); r = f()
    return time.perf_counter() - t0, time.process_time() - c0, r


def long_inputs(nbytes: int = 1_000_000) -> dict[str, str]:
    "1 MB (UTF-8) adversarial inputs: one huge pre-token each, or text without any whitespace."
    rnd = random.Random(0)
    latin = [chr(c) for c in range(0x21, 0x100) if not chr(c).isspace() and chr(c).isprintable()]
    bytes_like, n = [], 0
    while n < nbytes: c = rnd.choice(latin); bytes_like.append(c); n += len(c.encode())
    printable = [chr(c) for c in range(0x21, 0x7f)]
    assigned = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ('Cn', 'Cs')]  # Unicode 14
    anywhere, n = [], 0
    while n < nbytes: c = rnd.choice(assigned); anywhere.append(c); n += len(c.encode())
    return {"'a' x 1,000,000 (one pre-token)": 'a' * nbytes,
            'random CJK, 333,333 chars (one pre-token)': ''.join(chr(rnd.randrange(0x4e00, 0x9fa5)) for _ in range(nbytes // 3)),
            'random ASCII letters (one pre-token)': ''.join(rnd.choice('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ') for _ in range(nbytes)),
            'random Latin-1 bytes-like text, no whitespace': ''.join(bytes_like),
            'random printable ASCII, no whitespace': ''.join(rnd.choice(printable) for _ in range(nbytes)),
            'random assigned code points (Unicode 14), NFC': ''.join(anywhere)}


def bench_long(qwen, enc, repeats):
    "Rows (name, n pre-tokens, our median s, tiktoken median s, wall ratio, CPU ratio) for the long inputs."
    rows = []
    for name, s in long_inputs().items():
        s = unicodedata.normalize('NFC', s)  # tiktoken does not normalise: compare on NFC text (random code points change)
        ref = enc.encode_ordinary(s)
        t_ours, t_tt, c_ours, c_tt = [], [], [], []
        for _ in range(repeats):
            qwen.clear_cache()  # cold: the long pre-token is not in the cache
            t, c, ids = timed_cpu(lambda: qwen.encode(s)); assert ids == ref, name; t_ours.append(t); c_ours.append(c)
            t, c, _ = timed_cpu(lambda: enc.encode_ordinary(s)); t_tt.append(t); c_tt.append(c)
        rows.append((name, len(s.encode()), len(split_pretokens(s)), statistics.median(t_ours), statistics.median(t_tt),
                     statistics.median(o / t for o, t in zip(t_ours, t_tt)), statistics.median(o / t for o, t in zip(c_ours, c_tt))))
        print(f'  long: {name}: ours {rows[-1][3]:.3f}s, tiktoken {rows[-1][4]:.3f}s, ratio {rows[-1][5]:.2f}')
    w = [b'a' * 40_000]  # the old O(n^2) rescan against the heap on the same pre-token, for scale
    bpe_encode_words([b'a' * 200], qwen._table)
    t_scan, scan = timed(lambda: bpe_encode_words(w, qwen._table, long_from=1 << 62))
    t_heap, heap = timed(lambda: bpe_encode_words(w, qwen._table))
    assert scan == heap
    return rows, t_scan, t_heap


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--mb', type=float, default=10.0)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--vocab', type=int, default=8192)
    p.add_argument('--out', default=str(Path(__file__).with_name('results_tokenizer.md')))
    p.add_argument('--sections', default='encode,train,long', help='comma-separated subset of encode,train,long')
    a = p.parse_args(argv)
    sections = set(a.sections.split(','))
    if not sections <= {'encode', 'train', 'long'}: p.error(f'--sections: unknown {sorted(sections - {"encode", "train", "long"})}')
    import tiktoken, tokenizers
    text = unicodedata.normalize('NFC', stdlib_corpus(int(a.mb * 1e6)))
    nbytes = len(text.encode())
    print(f'corpus: {nbytes / 1e6:.2f} MB of stdlib source, {os.cpu_count()} CPUs, python {platform.python_version()}')
    qwen = BPETokenizer.from_tiktoken()
    enc = tiktoken.Encoding(name='qwen', pat_str=PATTERN, special_tokens=QWEN_SPECIAL_TOKENS,
                            mergeable_ranks={b: i for i, b in enumerate(qwen.token_bytes)})
    qwen.encode('warm up numba: the compiled ASCII path runs on pieces of 64+ characters ' * 2); qwen.clear_cache()
    chunks = safe_chunks(text)  # tokenizers is very slow on one 10 MB string; give it ~20 KB pieces (same ids)
    L = ['# Tokenizer benchmark', '',
         f'Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python {platform.python_version()}, '
         f'tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}. Corpus: {nbytes / 1e6:.2f} MB of Python '
         f'standard-library source (sorted *.py, NFC). Medians of {a.repeats} interleaved repeats. '
         f'Produced by `python bench/bench_tokenizer.py{"" if len(sections) == 3 else " --sections " + a.sections}`.', '']
    same = True

    if 'encode' in sections:  # ---- 1. encoding ----
        with tempfile.TemporaryDirectory() as d:
            qwen.save_hf(d); hf = tokenizers.Tokenizer.from_file(f'{d}/tokenizer.json')
        ref = enc.encode_ordinary(text)
        times = {'ours (cold cache)': [], 'ours (warm cache)': [], 'tiktoken': [], 'tokenizers encode_batch (1 thread, 1 run)': []}
        cpu = {k: [] for k in times}
        load0 = os.getloadavg()[0]
        for r in range(a.repeats):
            qwen.clear_cache()
            for k, f in [('ours (cold cache)', lambda: qwen.encode(text)), ('ours (warm cache)', lambda: qwen.encode(text)),
                         ('tiktoken', lambda: enc.encode_ordinary(text))]:
                t, c, ids = timed_cpu(f); assert ids == ref; times[k].append(t); cpu[k].append(c)
            if r == 0:  # slow (~10x tiktoken here): timed once, not a target
                t, c, es = timed_cpu(lambda: hf.encode_batch(chunks, add_special_tokens=False))
                assert [i for e in es for i in e.ids] == ref
                times['tokenizers encode_batch (1 thread, 1 run)'].append(t); cpu['tokenizers encode_batch (1 thread, 1 run)'].append(c)
            print(f'  encode repeat {r}: ' + ', '.join(f'{k} {v[-1]:.2f}s (cpu {cpu[k][-1]:.2f}s)' for k, v in times.items()))
        load1 = os.getloadavg()[0]
        enc_med = {k: statistics.median(v) for k, v in times.items()}
        # speed ratios: median over repeats of (tiktoken time / our time) measured back to back (robust to load changes)
        enc_ratio = {k: statistics.median(t / o for t, o in zip(times['tiktoken'], v)) for k, v in times.items()}
        cpu_ratio = {k: statistics.median(t / o for t, o in zip(cpu['tiktoken'], v)) for k, v in cpu.items()}
        L += ['## Encoding with the real Qwen2.5 vocabulary (single thread, identical ids checked)', '',
              '| encoder | median s | MB/s | speed vs tiktoken, wall (target >= 0.5x) | speed vs tiktoken, CPU time |',
              '|---|---|---|---|---|']
        for k, v in enc_med.items():
            L.append(f'| {k} | {v:.2f} | {nbytes / v / 1e6:.1f} | {enc_ratio[k]:.2f}x | {cpu_ratio[k]:.2f}x |')
        L += ['', '"cold": a fresh pre-token cache every repeat (BPE runs once per unique pre-token); "warm": the cache '
              'already holds the corpus\'s pre-tokens, as in a long-running data pipeline.', '',
              f'Load average (1 min) during the encoding runs: {load0:.1f} at the start, {load1:.1f} at the end, on '
              f'{os.cpu_count()} CPUs. On a shared machine the wall-time ratio swings with whoever else is running; the '
              'CPU-time ratio (time.process_time of this single-threaded process) counts only the work each encoder did.', '']

    if 'train' in sections:  # ---- 2. training, 3. slow == fast ----
        assert ''.join(chunks) == text
        train_bpe_fast(count_pretokens(chunks[:2]), 50)  # compile / load the numba cache outside the timing
        ttimes = {'ours (1 thread)': [], 'tokenizers BpeTrainer (1 thread)': [], 'tokenizers BpeTrainer (2 threads)': []}
        with tempfile.TemporaryDirectory() as d:
            cp = Path(d) / 'chunks.json'; cp.write_text(json.dumps(chunks))
            for r in range(a.repeats):
                t, ours = timed(lambda: BPETokenizer.train(chunks, a.vocab)); ttimes['ours (1 thread)'].append(t)
                h1 = hf_train(cp, a.vocab, 1); ttimes['tokenizers BpeTrainer (1 thread)'].append(h1['time'])
                h2 = hf_train(cp, a.vocab, 2); ttimes['tokenizers BpeTrainer (2 threads)'].append(h2['time'])
                print(f'  train repeat {r}: ' + ', '.join(f'{k} {v[-1]:.2f}s' for k, v in ttimes.items()))
        tr_med = {k: statistics.median(v) for k, v in ttimes.items()}
        tr_ratio = {k: statistics.median(o / t for o, t in zip(ttimes['ours (1 thread)'], v)) for k, v in ttimes.items()}
        ours_tokens = {''.join(__import__('qwen_edu.tokenizer', fromlist=['x']).BYTE_TO_UNICODE[c] for c in b) for b in ours.token_bytes}
        overlap = len(ours_tokens & set(h1['tokens'])) / len(h1['tokens'])
        sample = count_pretokens(text[:40_000])
        t_slow, slow = timed(lambda: train_bpe_slow(sample, 400))
        t_fast, fast = timed(lambda: train_bpe_fast(sample, 400))
        same = slow == fast
        L += [f'## BPE training to vocab {a.vocab:,} (from raw text: NFC, pre-tokenization, counting, merges)', '',
              '| trainer | median s | our time / this time (target <= 2) |', '|---|---|---|']
        for k, v in tr_med.items():
            L.append(f'| {k} | {v:.2f} | {tr_ratio[k]:.2f} |')
        L += ['', 'Ratios are medians over repeats of the ratio within each repeat (the runs of a repeat are back to back).',
              '', f'Same vocabulary? {overlap:.2%} of the tokens learned by tokenizers are also learned by ours (any '
              'difference comes from how ties between equally frequent pairs are broken).', '',
              '## Fast trainer = slow reference', '',
              f'400 merges on 40 KB: identical merges: **{same}** (slow {t_slow:.2f} s, fast {t_fast:.3f} s).', '']

    if 'long' in sections:  # ---- 4. long pre-tokens ----
        load0 = os.getloadavg()[0]
        rows, t_scan, t_heap = bench_long(qwen, enc, a.repeats)
        load1 = os.getloadavg()[0]
        L += ['## Long pre-tokens: 1 MB inputs (heap BPE, single thread, identical ids checked)', '',
              '| input (1 MB as UTF-8) | pre-tokens | ours, median s | tiktoken, median s | our time / tiktoken\'s, wall (target <= 3) | same, CPU time |',
              '|---|---|---|---|---|---|']
        for name, nb, npt, to, tt, rw, rc in rows:
            L.append(f'| {name} | {npt:,} | {to:.3f} | {tt:.3f} | {rw:.2f} | {rc:.2f} |')
        L += ['', 'Ours runs with an empty pre-token cache every repeat (a warm cache would hold the whole input). '
              f'Load average (1 min): {load0:.1f} at the start, {load1:.1f} at the end, on {os.cpu_count()} CPUs.', '',
              f'For scale, the rescan that `_bpe_many` used before the heap (still used below {__import__("qwen_edu.tokenizer", fromlist=["x"]).LONG_PIECE} '
              f'bytes): one pre-token of 40,000 `a` took {t_scan:.2f} s with the rescan and {t_heap * 1e3:.1f} ms with the heap '
              '(same ids).', '']

    Path(a.out).write_text('\n'.join(L))
    print('\n'.join(L))
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
