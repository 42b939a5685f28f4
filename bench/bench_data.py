"""Benchmarks of qwen_edu.data against the obvious baselines, interleaved in the same run.

1. LCS length: numba two-row DP (`lcs_length`) vs the textbook pure-Python DP table.
2. Decontamination of the built-in corpus against a planted test set: n-gram prefilter, bag prefilter, and the
   exact rule on every (window, test item) pair (`prefilter='none'`), which is the anchor all must agree with.
3. Batch loading: `RandomBatches.batch` vs nanoGPT's `get_batch` (np.memmap + torch.stack) on the same shard.
4. `build_corpus` end to end on the 4 MB built-in corpus with an 8192-token BPE (the edu-tiny setting), per step.

Usage: `python bench/bench_data.py` (about 2 minutes on 2 cores); writes bench/results_data.md.
"""
import json, os, platform, random, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
from qwen_edu import data as D
from qwen_edu.tokenizer import BPETokenizer

REPEATS = 5
torch.set_num_threads(int(os.environ.get('BENCH_THREADS', '2')))


def timeit(fn, n=1):
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n


def interleaved(fns, repeats=REPEATS, n=1):
    "Median seconds of each fn over `repeats` rounds, the fns run in turn within each round."
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items(): ts[k].append(timeit(f, n))
    return {k: statistics.median(v) for k, v in ts.items()}


def lcs_naive(a, b):
    L = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            L[i + 1][j + 1] = L[i][j] + 1 if a[i] == b[j] else max(L[i][j + 1], L[i + 1][j])
    return L[-1][-1]


def main():
    rows = []
    # 1. LCS
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, 400), rng.integers(0, 50, 200)
    al, bl = a.tolist(), b.tolist()
    assert D.lcs_length(a, b) == lcs_naive(al, bl)
    t = interleaved({'numba': lambda: D.lcs_length(a, b), 'python': lambda: lcs_naive(al, bl)}, n=1)
    rows.append(('LCS length, 400 x 200 tokens', 'pure-Python DP table', t['python'] * 1e3, t['numba'] * 1e3, 'ms'))

    # 2. decontamination
    docs = D.builtin_documents(1_000_000)
    tok = BPETokenizer.train([d['text'] for d in docs], 2048, special_tokens=['<|endoftext|>'])
    train_src = {d['source'] for d in docs}
    paras = [p for d in D.prose_documents(2_000_000, seed=7) if d['source'] not in train_src
             for p in d['text'].split('\n\n') if 200 < len(p) < 600]
    items = random.Random(0).sample(paras, 40)
    texts = [d['text'] for d in docs]
    for k, i in enumerate(random.Random(1).sample(range(len(texts)), 8)): texts[i] += '\n' + items[k] + '\n'
    tr, te = tok.encode_batch(texts, disallowed_special=()), tok.encode_batch(items, disallowed_special=())
    sub = tr[:150]                                   # the all-pairs anchor is slow: compare on a subset
    res = {pf: D.decontaminate(sub, te, prefilter=pf)[0] for pf in ('ngram', 'bag', 'none')}
    assert res['ngram'] == res['bag'] == res['none'], res
    t = interleaved({pf: (lambda pf=pf: D.decontaminate(sub, te, prefilter=pf)) for pf in ('ngram', 'bag', 'none')})
    for pf in ('ngram', 'bag'):
        rows.append((f'decontaminate {len(sub)} docs x {len(te)} items, prefilter={pf}', "exact rule on all pairs ('none')",
                     t['none'], t[pf], 's'))
    full = D.decontaminate(tr, te, prefilter='ngram')
    n_tok = sum(map(len, tr))

    # 3. batch loading
    tmp = Path(tempfile.mkdtemp())
    D.write_shards(tmp, {'train': rng.integers(0, 8192, 20_000_000)}, vocab_size=8192, eos_id=8191)
    mm = D.open_tokens(tmp, 'train')
    B, T = 32, 1024
    rb = D.RandomBatches(mm, B, T, seed=0)
    def nanogpt(i):
        data = np.memmap(tmp/'train.bin', dtype=np.uint16, mode='r')
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y
    cnt = iter(range(10**9))
    t = interleaved({'ours': lambda: rb.batch(next(cnt)), 'nanogpt': lambda: nanogpt(0)}, n=50)
    rows.append((f'one (B={B}, T={T}) batch from a 20M-token uint16 memmap', "nanoGPT get_batch", t['nanogpt'] * 1e3, t['ours'] * 1e3, 'ms'))

    # 4. the pipeline at edu-tiny size
    man_times = []
    for _ in range(3):
        out = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        man = D.build_corpus(out, 8192, size='4M', mixture={'code': 0.4, 'prose': 0.3, 'math': 0.3})
        man_times.append((time.perf_counter() - t0, man))
    wall, man = sorted(man_times, key=lambda o: o[0])[1]

    lines = ['# qwen_edu.data benchmarks', '',
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), torch threads "
             f"{torch.get_num_threads()}, Python {platform.python_version()}, numpy {np.__version__}. "
             f"Medians of {REPEATS} interleaved repeats (pipeline: median of 3).", '',
             '| what | baseline | baseline time | ours | speed-up |', '|---|---|---|---|---|']
    for what, base, tb, to, unit in rows:
        lines.append(f'| {what} | {base} | {tb:.3g} {unit} | {to:.3g} {unit} | {tb / to:.1f}x |')
    lines += ['', f"All three decontamination variants drop the same documents on the subset (asserted). On the whole "
              f"1 MB corpus ({len(tr)} documents, {n_tok:,} tokens, 40 test items, 8 planted) the n-gram prefilter "
              f"checks {full[2]['candidates']} pairs exactly out of {full[2]['windows'] * len(te):,} "
              f"(window, item) pairs and drops {len(full[0])} documents (the 8 planted ones, the rest pydoc sections that "
              f"repeat across topics, i.e. real overlaps).", '',
              f"## build_corpus, built-in corpus 4 MB, BPE 8192 trained in the build, mixture 0.4/0.3/0.3", '',
              f"Wall time {wall:.1f} s; {man['shards']['n_tokens']['train']:,} train + {man['shards']['n_tokens']['val']:,} "
              f"val tokens ({man['shards']['dtype']}).", '', '| step | seconds | removed |', '|---|---|---|']
    for k, v in man['steps'].items():
        if isinstance(v, dict) and 'seconds' in v:
            lines.append(f"| {k} | {v['seconds']:.2f} | {v.get('dropped', '')} |")
    Path(__file__).with_name('results_data.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
