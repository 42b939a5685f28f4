"""Why CPU speed collapses when other processes share the cores (issue #10 item 8), measured.

A CPU benchmark kept next to the GPU check because both feed the appendix chapter `nbs/A3_perf.ipynb`.
The workload is the shape of the SFT stage on the toy model of the post-training chapters: a 2-layer, hidden-128,
vocab-384 model; `--train-steps` AdamW steps on right-padded batches of 16 conversations (loss.item() every step,
as `sft_train` does), then greedy decoding of 24 new tokens for 2 batches of 32 prompts with `qwen_edu.generate`
(as `task_accuracy` does). Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY when torch loads it),
conditions interleaved, medians reported:

    python bench/gpu/bench_contention.py                    # threads 2/1 x OMP_WAIT_POLICY default/PASSIVE x quiet/3 hogs
    python bench/gpu/bench_contention.py --repeats 1 --smoke    # seconds: checks the script runs

A hog is `while True: pass` in its own process (what three other single-threaded jobs do to a 2-core machine).
Writes a markdown table to stdout and the raw runs as JSON lines to --json.
"""
import argparse, itertools, json, os, statistics, subprocess, sys, time

WORKER = r'''
import json, os, sys, time
a = json.loads(sys.argv[1])
import torch
if a['threads']: torch.set_num_threads(a['threads'])
if a.get('configure'):
    from qwen_edu.perf import configure_cpu_threads
    configure_cpu_threads()
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.generate import generate
torch.manual_seed(0)
cfg = QwenConfig.from_preset('edu-tiny', vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = QwenForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(0)
def batch(n=16):
    lens = torch.randint(40, 90, (n,), generator=g)
    x = torch.randint(0, 384, (n, int(lens.max())), generator=g)
    am = (torch.arange(x.shape[1])[None] < lens[:, None]).long()
    y = torch.where(am.bool(), x, -100)
    return x, y, am
def train(steps):
    model.train()
    for _ in range(steps):
        x, y, am = batch()
        loss = model(x, labels=y, attention_mask=am).loss
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); loss.item()
def gen(batches):
    model.eval()
    for _ in range(batches):
        prompts = [torch.randint(0, 384, (int(n),), generator=g).tolist() for n in torch.randint(30, 50, (32,), generator=g)]
        generate(model, prompts, max_new_tokens=24, stop_tokens=None)
train(2); gen(1)  # warm-up: allocator, first-call paths
t0 = time.perf_counter(); train(a['train_steps']); t1 = time.perf_counter(); gen(a['gen_batches']); t2 = time.perf_counter()
print(json.dumps(dict(train_s=t1 - t0, gen_s=t2 - t1, threads=torch.get_num_threads())))
'''

HOG = 'while True: pass'


def run_once(cond, train_steps, gen_batches, timeout):
    env = dict(os.environ)
    for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_NUM_THREADS'): env.pop(k, None)
    if cond['wait'] and cond['wait'].startswith('spin='): env['GOMP_SPINCOUNT'] = cond['wait'][5:]
    elif cond['wait']: env['OMP_WAIT_POLICY'] = cond['wait']
    arg = json.dumps(dict(threads=cond['threads'], train_steps=train_steps, gen_batches=gen_batches,
                          configure=cond.get('configure', False)))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, '-c', WORKER, arg], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(cond, error=f'timeout {timeout}s', wall_s=time.perf_counter() - t0)
    if p.returncode: return dict(cond, error=p.stderr[-500:], wall_s=time.perf_counter() - t0)
    return dict(cond, **json.loads(p.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - t0)


def start_hogs(n):
    return [subprocess.Popen([sys.executable, '-c', HOG]) for _ in range(n)]


def stop_hogs(hogs):
    for h in hogs: h.kill()
    for h in hogs: h.wait()


def loadavg():
    try: return float(open('/proc/loadavg').read().split()[0])
    except OSError: return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--hogs', type=int, default=3)
    p.add_argument('--train-steps', type=int, default=20)
    p.add_argument('--gen-batches', type=int, default=2)
    p.add_argument('--threads', default='2,1', help='comma-separated torch thread counts (0: torch default)')
    p.add_argument('--waits', default='default,PASSIVE',
                   help="OMP_WAIT_POLICY values ('default': unset; 'spin=N': GOMP_SPINCOUNT=N instead)")
    p.add_argument('--configure', action='store_true', help='also run with qwen_edu.perf.configure_cpu_threads()')
    p.add_argument('--timeout', type=float, default=300)
    p.add_argument('--smoke', action='store_true', help='1 train step, 1 batch, no hogs: checks the script runs')
    p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    if a.smoke: a.train_steps, a.gen_batches, a.hogs, a.repeats = 1, 1, 0, 1
    conds = [dict(threads=int(t), wait=None if w == 'default' else w)
             for t, w in itertools.product(a.threads.split(','), a.waits.split(','))]
    if a.configure: conds += [dict(threads=0, wait=None, configure=True)]  # the fix: threads from CPUs and load
    loads = [(False, 0)] + ([(True, a.hogs)] if a.hogs else [])
    runs = []
    for r in range(a.repeats):
        for hog, n in loads:
            hogs = start_hogs(n) if hog else []
            try:
                if hogs: time.sleep(1)
                for c in conds:
                    res = run_once(dict(c, hogs=n, repeat=r, load_before=loadavg()), a.train_steps, a.gen_batches, a.timeout)
                    runs.append(res); print(json.dumps(res), file=sys.stderr, flush=True)
                    if a.json:
                        with open(a.json, 'a') as f: f.write(json.dumps(res) + '\n')
            finally: stop_hogs(hogs)
    print(table(runs))
    return runs


def _key(c): return (c['threads'], c['wait'], c.get('configure', False))


def _wait_name(w):
    if not w: return 'default (spin 300k)'
    return f'GOMP_SPINCOUNT={w[5:]}' if w.startswith('spin=') else f'OMP_WAIT_POLICY={w}'


def table(runs):
    "Markdown: median train/generate seconds per condition, quiet and with hogs, and the slowdown ratio."
    def med(rs, k):
        v = [x[k] for x in rs if k in x]
        return statistics.median(v) if v else None
    keys = list(dict.fromkeys(_key(r) for r in runs))
    hogs = max(r['hogs'] for r in runs)
    lines = [f"| threads | OpenMP wait | train quiet s | train {hogs} hogs s | ratio | generate quiet s | "
             f"generate {hogs} hogs s | ratio | runs |", '|---|---|---|---|---|---|---|---|---|']
    fmt = lambda v, f='.2f': 'n/a' if v is None else format(v, f)
    for k in keys:
        q = [r for r in runs if _key(r) == k and r['hogs'] == 0]
        h = [r for r in runs if _key(r) == k and r['hogs'] > 0]
        tq, th, gq, gh = med(q, 'train_s'), med(h, 'train_s'), med(q, 'gen_s'), med(h, 'gen_s')
        ratio = lambda x, y: None if x is None or y is None else y / x
        name = 'configure_cpu_threads()' if k[2] else str(k[0] or 'torch default')
        lines.append(f"| {name} | {_wait_name(k[1])} | {fmt(tq)} | {fmt(th)} | {fmt(ratio(tq, th), '.1f')}x | "
                     f"{fmt(gq)} | {fmt(gh)} | {fmt(ratio(gq, gh), '.1f')}x | {len(q)}+{len(h)} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
