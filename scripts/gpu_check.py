"""The GPU check of issue #10 (item 7): every GPU path once, each section under its own timeout, one results table.

    bash scripts/gpu_check.sh                  # on a CUDA machine: <= 8 minutes (--budget 480), no downloads
    bash scripts/gpu_check.sh --cpu-smoke      # the same code paths, tiny, on the CPU (tests/test_gpu_check.py)

Sections, most important first (a time-out or failure in one never stops the others):
  info        (a) nvidia-smi, torch/CUDA/NCCL/triton versions, the GPU's peak FLOP/s (qwen_edu.perf)
  data        (c) the built-in corpus prepared (tokenizer + shards, on the CPU; cached in runs/builtin)
  train       (c) edu-small, bf16 autocast, --compile, fused AdamW, 200 steps: tokens/s, MFU, val loss
  mfu         (f) edu-base 16x2048 compiled (bench/gpu/bench_mfu.py): tokens/s, TFLOP/s, MFU (target >= 45%)
  pipeline    (d) every stage of `python -m qwen_edu.pipeline` a few steps on CUDA
  decode      (g) qwen_edu.generate vs transformers generate, same random weights, greedy (bench/gpu/bench_decode.py)
  torchrun    (e) `torchrun --nproc_per_node=1 -m qwen_edu.train` and an NCCL all_reduce probe
  cuda_tests  (b) `pytest -m cuda` and the notebooks' `#| cuda` cells
  mfu_eager   (f) edu-base without compile, for contrast (runs only if the budget allows)
Logs and JSON go to the output directory ($OUT if set, else bench/gpu/out); the table to --results
(default bench/results_gpu.md; in --cpu-smoke mode OUTDIR/results_gpu.md), copied to OUTDIR after every row.
Also: `--nccl-probe` (run under torchrun: one all_reduce) and `--run-nb-cells NB [--flags cuda]` (run a notebook's
cells the way nbdev_test does, without nbdev).
"""
import argparse, datetime, json, os, platform, re, shutil, signal, subprocess, sys, time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# the smoke model: small enough for 2-3 CPU steps in seconds (TrainConfig model overrides)
SMOKE_MODEL = ['--hidden-size', '64', '--intermediate-size', '128', '--num-hidden-layers', '2',
               '--num-attention-heads', '4', '--num-key-value-heads', '2']
SMOKE_MODEL_JSON = json.dumps(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2))


@dataclass
class Section:
    name: str
    item: str                 # the letter (a-g)
    what: str
    timeout: float            # seconds on the GPU
    smoke_timeout: float      # seconds in --cpu-smoke mode
    commands: object          # (ctx) -> list of (label, argv) run in order; a failing one fails the section
    keys: object = None       # (ctx) -> dict of key numbers read from the section's outputs
    ok_codes: dict = field(default_factory=dict)  # label -> extra return codes that count as success


# ----------------------------------------------------------------------------------------------------- sections
INFO = r'''
import json, os, sys, torch
from qwen_edu.perf import peak_flops, PEAK_BF16_FLOPS
d = dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
         cuda_available=torch.cuda.is_available(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=torch.cuda.get_device_name(0), capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
             gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
             bf16=torch.cuda.is_bf16_supported(), peak_tflops=(peak_flops('cuda', warn=False) or 0) / 1e12 or None,
             peak_known=torch.cuda.get_device_name(0) in PEAK_BF16_FLOPS)
    try: v = torch.cuda.nccl.version(); d['nccl'] = '.'.join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e: d['nccl'] = f'unavailable ({type(e).__name__})'
for m in ('triton', 'transformers', 'numpy', 'safetensors'):
    try: d[m] = __import__(m).__version__
    except Exception: d[m] = None
print(json.dumps(d, indent=1))
json.dump(d, open(sys.argv[1], 'w'), indent=1)
'''

DATA = r'''
import json, sys, time
from pathlib import Path
try: from qwen_edu.data import prepare_builtin_data
except ImportError: from qwen_edu.pipeline import prepare_builtin_data
kw = json.loads(sys.argv[2])
root = Path(kw.get('root', 'runs/builtin'))
cached = (root / 'built.json').exists() or (root / 'data' / 'done.json').exists()
t0 = time.perf_counter(); d = prepare_builtin_data(**kw); dt = time.perf_counter() - t0
try: stamp = json.loads((root / 'built.json').read_text())
except (OSError, ValueError): stamp = {}
res = dict(data=str(d), seconds=round(dt, 1), cached=cached, n_tokens=stamp.get('n_tokens'))
print(json.dumps(res)); json.dump(res, open(sys.argv[1], 'w'))
'''


def _info(c):
    cmds = [('torch', [PY, '-c', INFO, str(c.out / 'info.json')])]
    if shutil.which('nvidia-smi'): cmds.insert(0, ('nvidia-smi', ['nvidia-smi']))
    elif not c.smoke: cmds.insert(0, ('nvidia-smi', ['sh', '-c', 'echo "nvidia-smi not found"; exit 1']))
    return cmds


def _info_keys(c):
    d = _json(c.out / 'info.json')
    if not d: return {}
    keys = dict(torch=d.get('torch'), cuda=d.get('cuda'))
    if d.get('gpu'):
        keys.update(gpu=d['gpu'], memory=f"{d.get('gpu_memory_gib')} GiB", capability=d.get('capability'),
                    peak=f"{d['peak_tflops']:.0f} TFLOP/s" if d.get('peak_tflops') else 'unknown (pass --peak-flops)',
                    nccl=d.get('nccl'), triton=d.get('triton'))
    else: keys['gpu'] = 'none (CPU)'
    return keys


def _data(c):
    kw = dict(root=str(c.out / 'builtin'), corpus_size=100_000, vocab_size=512) if c.smoke else {}
    return [('prepare', [PY, '-c', DATA, str(c.out / 'data.json'), json.dumps(kw)])]


def _data_keys(c):
    d = _json(c.out / 'data.json')
    return dict(seconds=d.get('seconds'), cached=d.get('cached'), tokens=d.get('n_tokens')) if d else {}


def _data_arg(c): return str(c.out / 'builtin' / 'data') if c.smoke else 'builtin'


def _train(c):
    out = c.out / 'train'
    if c.smoke:
        args = ['--preset', 'edu-tiny', *SMOKE_MODEL, '--device', 'cpu', '--dtype', 'fp32', '--max-steps', '3',
                '--batch-size', '2', '--seq-len', '32', '--eval-every', '3', '--eval-batches', '1', '--log-every', '1',
                '--ckpt-every', '3']
    else:
        args = ['--preset', 'edu-small', '--device', 'cuda', '--dtype', 'bf16', '--compile', '--max-steps', '200',
                '--batch-size', '32', '--seq-len', '512', '--eval-every', '200', '--eval-batches', '8',
                '--log-every', '20', '--ckpt-every', '200']
    return [('train', [PY, '-m', 'qwen_edu.train', *args, '--data', _data_arg(c), '--out', str(out), '--no-progress'])]


def _train_keys(c, sub='train'):
    s, ms = _json(c.out / sub / 'summary.json'), _jsonl(c.out / sub / 'metrics.jsonl')
    tps = [m['tokens_per_s'] for m in ms[1:] if m.get('tokens_per_s')] or [m['tokens_per_s'] for m in ms if m.get('tokens_per_s')]
    keys = dict(steps=s.get('step'), val_loss=_r(s.get('val_loss'), 4), tokens_per_s=_r(s.get('tokens_per_s'), 0),
                best_tokens_per_s=_r(max(tps), 0) if tps else None, mfu=_pct(s.get('mfu')), elapsed_s=_r(s.get('elapsed_s'), 1))
    return {k: v for k, v in keys.items() if v is not None}


def _mfu(c, compile=True):
    name = 'mfu' if compile else 'mfu_eager'
    if c.smoke: args = ['--smoke'] + (['--compile'] if compile and c.smoke_compile else [])
    else: args = (['--compile', '--steps', '20'] if compile else ['--steps', '8', '--warmup', '2'])
    return [(name, [PY, str(REPO / 'bench/gpu/bench_mfu.py'), *args, '--json', str(c.out / f'{name}.json')])]


def _mfu_keys(c, name='mfu'):
    d = _json(c.out / f'{name}.json')
    if not d: return {}
    return dict(preset=d.get('preset'), shape=f"{d.get('batch')}x{d.get('seq')}", compile=d.get('compile'),
                tokens_per_s=_r(d.get('tokens_per_s'), 0), tflops=_r(d.get('achieved_tflops'), 1), mfu=_pct(d.get('mfu')))


def _pipeline(c):
    out = c.out / 'pipeline'
    if c.smoke:
        args = ['--preset', 'edu-tiny', '--max-steps', '3', '--device', 'cpu', '--dtype', 'fp32', '--corpus-size', '100000',
                '--vocab-size', '512', '--batch-size', '2', '--seq-len', '32', '--eval-every', '3', '--eval-batches', '1',
                '--train-overrides', SMOKE_MODEL_JSON]
    else:  # a 1 MB corpus keeps the CPU stages (tokenizer, shards) short; the stages on CUDA are the point
        args = ['--preset', 'edu-tiny', '--max-steps', '40', '--device', 'cuda', '--dtype', 'bf16', '--corpus-size', '1000000']
    return [('pipeline', [PY, '-m', 'qwen_edu.pipeline', *args, '--out', str(out), '--no-progress'])]


def _pipeline_keys(c):
    rep = _json(c.out / 'pipeline' / 'report.json')
    if not rep: return {}
    keys = dict(stages=','.join(rep))
    for st, v in rep.items():
        if isinstance(v, dict) and isinstance(v.get('seconds'), (int, float)): keys[f'{st}_s'] = _r(v['seconds'], 1)
    return keys


def _decode(c):
    args = ['--smoke'] if c.smoke else []
    return [('decode', [PY, str(REPO / 'bench/gpu/bench_decode.py'), *args, '--json', str(c.out / 'decode.json')])]


def _decode_keys(c):
    d = _json(c.out / 'decode.json')
    if not d: return {}
    return dict(model=d.get('preset'), batch=d.get('batch'), new_tokens=d.get('new_tokens'), dtype=d.get('dtype'),
                ours_tok_s=_r(d.get('ours_tokens_per_s'), 0), hf_tok_s=_r(d.get('hf_tokens_per_s'), 0),
                ratio=f"{d['ratio']:.2f}x" if d.get('ratio') else None, same_tokens=_pct(d.get('token_agreement')))


def _torchrun(c):
    run = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    if c.smoke:
        args = ['--preset', 'edu-tiny', *SMOKE_MODEL, '--device', 'cpu', '--dtype', 'fp32', '--max-steps', '2',
                '--batch-size', '2', '--seq-len', '32', '--eval-every', '2', '--eval-batches', '1', '--log-every', '1',
                '--ckpt-every', '2']
    else:
        args = ['--preset', 'edu-tiny', '--device', 'cuda', '--dtype', 'bf16', '--max-steps', '20', '--batch-size', '16',
                '--seq-len', '256', '--eval-every', '20', '--eval-batches', '4', '--log-every', '10', '--ckpt-every', '20']
    return [('train', [*run, '-m', 'qwen_edu.train', *args, '--data', _data_arg(c), '--out', str(c.out / 'torchrun'),
                       '--no-progress']),
            ('probe', [*run, str(Path(__file__).resolve()), '--nccl-probe', '--backend', 'gloo' if c.smoke else 'nccl',
                       '--json', str(c.out / 'probe.json')])]


def _torchrun_keys(c):
    keys = _train_keys(c, 'torchrun')
    p = _json(c.out / 'probe.json')
    if p: keys.update(backend=p.get('backend'), all_reduce=p.get('ok'))
    return keys


def cuda_test_files():
    "Test files with tests marked `cuda` (collecting only these keeps the GPU image's missing dev packages out of it)."
    return [f for f in sorted((REPO / 'tests').glob('test_*.py')) if 'mark.cuda' in f.read_text(errors='replace')]


def _cuda_tests(c):
    files = cuda_test_files()
    cmds = [('pytest', [PY, '-m', 'pytest', *map(str, files), '-m', 'cuda', '-q', '-p', 'no:cacheprovider',
                        '--junitxml', str(c.out / 'cuda_tests.xml')])] if files else []
    for nb in cuda_notebooks():
        cmds.append((f'nb:{nb.name}', [PY, str(Path(__file__).resolve()), '--run-nb-cells', str(nb),
                                        '--flags', '' if c.smoke else 'cuda']))
    return cmds


def _cuda_tests_keys(c):
    keys = {}
    try:
        x = (c.out / 'cuda_tests.xml').read_text()
        m = re.search(r'<testsuite [^>]*', x)
        if m:
            a = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
            keys['tests'] = f"{a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, {a.get('skipped')} skipped"
    except OSError: pass
    if not cuda_test_files(): keys['tests'] = 'no tests marked cuda'
    nbs = cuda_notebooks()
    keys['notebooks'] = ', '.join(nb.name for nb in nbs) or 'no #| cuda cells'
    return keys


SECTIONS = [
    Section('info', 'a', 'nvidia-smi, torch/CUDA info', 15, 30, _info, _info_keys),
    Section('data', 'c', 'built-in corpus prepared (CPU)', 40, 60, _data, _data_keys),
    Section('train', 'c', 'edu-small bf16 --compile, fused AdamW, 200 steps', 110, 60, _train, _train_keys),
    Section('mfu', 'f', 'edu-base 16x2048 compiled: MFU', 85, 30, lambda c: _mfu(c, True), lambda c: _mfu_keys(c, 'mfu')),
    Section('pipeline', 'd', 'every pipeline stage on CUDA (edu-tiny, 40 steps)', 85, 120, _pipeline, _pipeline_keys),
    Section('decode', 'g', 'decode tokens/s vs transformers generate', 40, 40, _decode, _decode_keys),
    Section('torchrun', 'e', 'torchrun --nproc_per_node=1 train + NCCL probe', 40, 60, _torchrun, _torchrun_keys),
    Section('cuda_tests', 'b', 'pytest -m cuda, notebooks #| cuda cells', 35, 60, _cuda_tests, _cuda_tests_keys,
            ok_codes={'pytest': (5,)}),  # 5: no tests collected
    Section('mfu_eager', 'f', 'edu-base without compile (contrast)', 25, 30, lambda c: _mfu(c, False),
            lambda c: _mfu_keys(c, 'mfu_eager')),
]


# ------------------------------------------------------------------------------------------------------ helpers
def _json(p):
    try: return json.loads(Path(p).read_text())
    except (OSError, ValueError): return {}


def _jsonl(p):
    try: return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]
    except (OSError, ValueError): return []


def _r(v, n):
    return None if not isinstance(v, (int, float)) else (round(v) if n == 0 else round(v, n))


def _pct(v): return None if not isinstance(v, (int, float)) else f'{v:.1%}'


def cuda_notebooks(nbs=None):
    "Notebooks with at least one `#| cuda` code cell."
    out = []
    for nb in sorted(Path(nbs or REPO / 'nbs').glob('*.ipynb')):
        try: cells = json.loads(nb.read_text())['cells']
        except (OSError, ValueError, KeyError): continue
        if any(c.get('cell_type') == 'code' and _directives(''.join(c.get('source', ''))).get('cuda') is not None
               for c in cells): out.append(nb)
    return out


def _directives(src):
    "nbdev cell directives (`#| cuda`, `#| eval: false`, ...) at the top of a cell: {name: value}."
    d = {}
    for line in src.splitlines():
        s = line.strip()
        if not s: continue
        if not s.startswith('#|'): break
        k, _, v = s[2:].strip().partition(':')
        d[k.strip().split()[0] if k.strip() else ''] = v.strip() if v else ''
    return d


def _last_error(log):
    "The last line of a log that looks like an error, for the results row."
    try: lines = Path(log).read_text(errors='replace').splitlines()
    except OSError: return None
    for l in reversed(lines):
        if re.search(r'(Error|error:|FAILED|Traceback|Killed|exit code)', l): return l.strip()[:200]
    return lines[-1].strip()[:200] if lines else None


def _kill(p):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try: os.killpg(p.pid, sig)
        except ProcessLookupError: return
        try: p.wait(timeout=5); return
        except subprocess.TimeoutExpired: pass


def run_command(argv, log, timeout, env):
    "Run `argv` in its own process group, output appended to `log`; (returncode or 'timeout', seconds)."
    t0 = time.perf_counter()
    with open(log, 'a') as f:
        f.write(f"\n$ {' '.join(argv)}\n"); f.flush()
        try: p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n"); return 127, time.perf_counter() - t0
        try: rc = p.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _kill(p); f.write(f"\n[gpu_check] killed after {timeout:.0f}s (section timeout)\n"); rc = 'timeout'
        except BaseException:
            _kill(p); raise
    return rc, time.perf_counter() - t0


class Ctx:
    def __init__(self, out, smoke, smoke_compile=False):
        self.out, self.smoke, self.smoke_compile = Path(out), smoke, smoke_compile


def section_env(smoke):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.update(PYTHONUNBUFFERED='1', QWEN_EDU_DEBUG='1', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1',
               TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', MPLBACKEND='Agg')
    if smoke: env.setdefault('OMP_NUM_THREADS', '1')  # a shared CPU: one thread per process (see nbs/A3_perf)
    return env


def run_section(s, c, deadline, env):
    "Run one section; its row dict (status ok/fail/timeout/skip, seconds, key numbers, log)."
    log = c.out / f'{s.name}.log'
    log.write_text(f"[gpu_check] {s.name} ({s.item}): {s.what}\n")
    left = deadline - time.perf_counter()
    limit = min(s.smoke_timeout if c.smoke else s.timeout, left)
    row = dict(section=s.name, item=s.item, what=s.what, log=str(log))
    if limit < 5:
        return dict(row, status='skip', seconds=0.0, keys=dict(reason=f'budget spent ({left:.0f}s left)'))
    t0, status, notes = time.perf_counter(), 'ok', {}
    try: cmds = s.commands(c)
    except Exception as e:  # a broken section definition is a failed section, not a stopped check
        cmds, status, notes['error'] = [], 'fail', f'{type(e).__name__}: {e}'
    for label, argv in cmds:
        left = limit - (time.perf_counter() - t0)
        if left < 1: status = 'timeout'; notes[label] = 'not started (section time spent)'; continue
        rc, dt = run_command(argv, log, left, env)
        if rc == 'timeout': status = 'timeout'; notes[label] = f'timeout after {dt:.0f}s'
        elif rc != 0 and rc not in s.ok_codes.get(label, ()):
            status = 'fail'; notes[label] = f'exit {rc}'
        elif rc != 0: notes[label] = f'exit {rc} (nothing to run)'
    try: keys = s.keys(c) if s.keys else {}
    except Exception as e: keys = {'keys_error': f'{type(e).__name__}: {e}'}
    if status != 'ok': notes['last_error'] = _last_error(log)
    return dict(row, status=status, seconds=round(time.perf_counter() - t0, 1), keys={**keys, **notes})


def _fmt_keys(keys):
    return ', '.join(f'{k}={v}' for k, v in keys.items() if v is not None).replace('|', '/')


def header(c, argv):
    try: from importlib.metadata import version; tv = version('torch')
    except Exception: tv = 'unknown'
    gpu = 'none (CPU smoke)' if c.smoke else 'unknown'
    if shutil.which('nvidia-smi'):
        try:
            gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (subprocess.SubprocessError, OSError, IndexError): pass
    mode = 'CPU smoke (tiny models; numbers meaningless)' if c.smoke else 'GPU'
    return [f"# GPU check ({mode})", '',
            f"- GPU: {gpu}", f"- torch {tv}, python {platform.python_version()}, {os.cpu_count()} CPUs",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- command: `bash scripts/gpu_check.sh {' '.join(argv)}`".replace('  ', ' ').rstrip(),
            f"- logs and JSON: `{c.out}`", '',
            '| section | item | status | seconds | key numbers |', '|---|---|---|---:|---|']


def write_results(path, head, rows, out):
    lines = head + [f"| {r['section']} | {r['item']} | {r['status']} | {r['seconds']:.1f} | {_fmt_keys(r['keys'])} |"
                    for r in rows]
    text = '\n'.join(lines) + '\n'
    for p in {Path(path), Path(out) / 'results_gpu.md'}:
        p.parent.mkdir(parents=True, exist_ok=True); p.write_text(text)
    (Path(out) / 'gpu_check.json').write_text(json.dumps(dict(rows=rows), indent=1))


def main_check(a, argv):
    out = Path(a.out or os.environ.get('OUT') or REPO / 'bench/gpu/out').resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = Ctx(out, a.cpu_smoke, a.smoke_compile)
    results = Path(a.results) if a.results else (out / 'results_gpu.md' if a.cpu_smoke else REPO / 'bench/results_gpu.md')
    wanted = a.only.split(',') if a.only else [s.name for s in SECTIONS]
    bad = set(wanted) - {s.name for s in SECTIONS}
    if bad: sys.exit(f"gpu_check: unknown section(s) {sorted(bad)}; choose from {', '.join(s.name for s in SECTIONS)}")
    if not a.cpu_smoke and not shutil.which('nvidia-smi'):
        print("gpu_check: warning: nvidia-smi not found; is this a GPU machine? (use --cpu-smoke on a CPU)", file=sys.stderr)
    env, head, rows = section_env(a.cpu_smoke), header(c, argv), []
    deadline = time.perf_counter() + a.budget
    print(f"gpu_check: {len(wanted)} sections, budget {a.budget:.0f}s, output {out}, results {results}", flush=True)
    for s in SECTIONS:
        if s.name not in wanted: continue
        print(f"[{s.name}] ({s.item}) {s.what} ...", flush=True)
        r = run_section(s, c, deadline, env)
        rows.append(r); write_results(results, head, rows, out)
        print(f"[{s.name}] {r['status']} in {r['seconds']:.1f}s: {_fmt_keys(r['keys'])}", flush=True)
    n_ok = sum(r['status'] == 'ok' for r in rows)
    print(f"gpu_check: {n_ok}/{len(rows)} sections ok; results {results} (copy in {out})")
    return 0 if n_ok == len(rows) else 1


# ------------------------------------------------------------------------------------------- helper entry points
def nccl_probe(a):
    "Under torchrun: join the process group and all_reduce one tensor (NCCL on CUDA, gloo on the CPU)."
    import torch, torch.distributed as dist
    rank, local = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    dev = torch.device('cuda', local) if a.backend == 'nccl' else torch.device('cpu')
    if dev.type == 'cuda': torch.cuda.set_device(dev)
    dist.init_process_group(a.backend)
    try:
        x = torch.full((4,), float(rank + 1), device=dev)
        dist.all_reduce(x)
        world = dist.get_world_size()
        ok = bool(torch.allclose(x.cpu(), torch.full((4,), world * (world + 1) / 2)))
        res = dict(backend=dist.get_backend(), world=world, ok=ok, device=str(dev))
        print(json.dumps(res))
        if rank == 0 and a.json: Path(a.json).write_text(json.dumps(res))
        dist.barrier()
    finally: dist.destroy_process_group()
    return 0 if ok else 1


def _fastcore_shim():
    "fastcore.test's helpers for notebooks run where fastcore is not installed (the GPU image has no nbdev)."
    import types, math
    import importlib.util
    if importlib.util.find_spec('fastcore') is not None: return
    m = types.ModuleType('fastcore.test')

    def test_eq(a, b): assert a == b, f"{a!r} != {b!r}"
    def test_ne(a, b): assert a != b, f"{a!r} == {b!r}"
    def test_is(a, b): assert a is b, f"{a!r} is not {b!r}"

    def test_close(a, b, eps=1e-5):
        import numpy as np
        assert np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=eps), f"{a!r} not close to {b!r}"

    def test_fail(f, msg='', contains='', args=None, kwargs=None):
        try: f(*(args or []), **(kwargs or {}))
        except Exception as e:
            assert not contains or contains in str(e), f"{e!r} does not contain {contains!r}"; return
        assert False, f"expected an exception {msg}"

    for fn in (test_eq, test_ne, test_is, test_close, test_fail): setattr(m, fn.__name__, fn)
    m.__all__ = [f.__name__ for f in (test_eq, test_ne, test_is, test_close, test_fail)]
    pkg = types.ModuleType('fastcore'); pkg.test = m; pkg.__path__ = []
    sys.modules.setdefault('fastcore', pkg); sys.modules['fastcore.test'] = m
    _ = math


def run_nb_cells(nb, flags=()):
    """Run a notebook's code cells in order, as nbdev_test does: skip `#| eval: false`, and notest/slow/cuda cells
    unless their flag is in `flags`; IPython magics and shell lines are skipped. Returns the number of cells run."""
    import matplotlib
    matplotlib.use('Agg')
    _fastcore_shim()
    nb = Path(nb).resolve()
    cells = json.loads(nb.read_text())['cells']
    os.chdir(nb.parent)
    sys.path.insert(0, str(REPO))
    g = {'__name__': '__main__', '__file__': str(nb)}
    n = 0
    for i, cell in enumerate(cells):
        if cell.get('cell_type') != 'code': continue
        src = ''.join(cell.get('source', ''))
        d = _directives(src)
        if d.get('eval') == 'false': continue
        if any(f in d and f not in flags for f in ('notest', 'slow', 'cuda')): continue
        code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))
        t0 = time.perf_counter()
        try: exec(compile(code, f'{nb.name}[cell {i}]', 'exec'), g)
        except Exception:
            print(f"{nb.name}: cell {i} failed:\n{src[:800]}", file=sys.stderr); raise
        n += 1
        print(f"{nb.name}: cell {i} ok ({time.perf_counter() - t0:.1f}s){' [cuda]' if 'cuda' in d else ''}", flush=True)
    print(f"{nb.name}: {n} cells run (flags: {' '.join(flags) or 'none'})")
    return n


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-smoke', action='store_true', help='the same sections, tiny, on the CPU (about 2 minutes)')
    p.add_argument('--smoke-compile', action='store_true', help='in --cpu-smoke mode also torch.compile the MFU bench')
    p.add_argument('--out', default=None, help='output directory (default: $OUT, else bench/gpu/out)')
    p.add_argument('--results', default=None, help='results table (default bench/results_gpu.md; smoke: OUT/results_gpu.md)')
    p.add_argument('--budget', type=float, default=480, help='seconds for all sections together (default 480)')
    p.add_argument('--only', default=None, help='comma-separated sections to run (default: all)')
    p.add_argument('--nccl-probe', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--backend', default='nccl', help=argparse.SUPPRESS)
    p.add_argument('--json', default=None, help=argparse.SUPPRESS)
    p.add_argument('--run-nb-cells', default=None, metavar='NB', help="run a notebook's cells (flags: --flags)")
    p.add_argument('--flags', default='', help='with --run-nb-cells: space-separated flags to run (e.g. cuda)')
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.nccl_probe: return nccl_probe(a)
    if a.run_nb_cells: run_nb_cells(a.run_nb_cells, tuple(a.flags.split())); return 0
    if a.budget <= 0: sys.exit(f"gpu_check: --budget must be > 0 seconds, got {a.budget}")
    return main_check(a, argv)


if __name__ == '__main__':
    sys.exit(main())
