"scripts/gpu_check.sh: the --cpu-smoke run (every section's code path, tiny, on the CPU) and the runner's pieces."
import importlib.util, json, os, subprocess, sys, time
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('gpu_check', REPO / 'scripts' / 'gpu_check.py')
gc = importlib.util.module_from_spec(spec); spec.loader.exec_module(gc)


def _pipeline_has_device_flags():
    import dataclasses
    from qwen_edu.pipeline import PipelineConfig
    return 'device' in {f.name for f in dataclasses.fields(PipelineConfig)}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    "One `bash scripts/gpu_check.sh --cpu-smoke` into a temp dir (results kept out of the repository)."
    out = tmp_path_factory.mktemp('gpu_check')
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    env.pop('OUT', None)
    t0 = time.perf_counter()
    p = subprocess.run(['bash', str(REPO / 'scripts' / 'gpu_check.sh'), '--cpu-smoke', '--out', str(out),
                        '--results', str(out / 'results.md')], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    rows = json.loads((out / 'gpu_check.json').read_text())['rows']
    return dict(out=out, proc=p, rows={r['section']: r for r in rows}, seconds=time.perf_counter() - t0)


def test_smoke_every_section_ok(smoke):
    rows = smoke['rows']
    assert list(rows) == [s.name for s in gc.SECTIONS]
    bad = {k: (r['status'], r['keys']) for k, r in rows.items() if r['status'] != 'ok' and k != 'pipeline'}
    assert not bad, f"sections not ok: {bad}\n{smoke['proc'].stdout[-3000:]}"
    pipe = rows['pipeline']
    if pipe['status'] != 'ok':
        cmd = (Path(pipe['log']).read_text().split('\n$ ', 1)[-1].splitlines() or [''])[0]
        if not _pipeline_has_device_flags():
            pytest.xfail(f"the pipeline CLI has no --device/--dtype yet; failing command: {cmd}")
        pytest.fail(f"pipeline section {pipe['status']}: {pipe['keys']}; command: {cmd}")


def test_smoke_results_and_numbers(smoke):
    out, rows = smoke['out'], smoke['rows']
    text = (out / 'results.md').read_text()
    assert text.startswith('# GPU check (CPU smoke') and '| section | item | status | seconds | key numbers |' in text
    for name in rows: assert f'| {name} |' in text
    assert (out / 'results_gpu.md').read_text() == text                       # the copy that comes back with $OUT
    k = rows['train']['keys']; assert k['steps'] == 3 and k['tokens_per_s'] > 0 and k['val_loss'] > 0
    assert rows['mfu']['keys']['tokens_per_s'] > 0
    d = json.loads((out / 'decode.json').read_text())
    assert d['token_agreement'] == 1.0 and d['ours_tokens_per_s'] > 0 and d['hf_tokens_per_s'] > 0  # fp32: same tokens
    assert json.loads((out / 'probe.json').read_text()) == dict(backend='gloo', world=1, ok=True, device='cpu')
    assert rows['torchrun']['keys']['steps'] == 2
    assert 'A3_perf.ipynb' in rows['cuda_tests']['keys']['notebooks']
    assert smoke['seconds'] < 400, smoke['seconds']


def test_directives():
    assert gc._directives('#| cuda\nx = 1') == {'cuda': ''}
    assert gc._directives('#| eval: false\n#| slow\nimport x') == {'eval': 'false', 'slow': ''}
    assert gc._directives('x = 1\n#| cuda') == {}
    assert gc._directives('\n#|export\nx') == {'export': ''}


def _nb(path, cells):
    path.write_text(json.dumps(dict(cells=[dict(cell_type='code', source=s, metadata={}, outputs=[]) for s in cells],
                                    metadata={}, nbformat=4, nbformat_minor=5)))
    return path


def test_run_nb_cells(tmp_path):
    nb = _nb(tmp_path / 'x.ipynb', ['xs = [1]', '#| cuda\nxs.append("cuda")', '#| slow\nxs.append("slow")',
                                    '#| eval: false\nraise SystemExit', '%timeit 1\nxs.append(2)',
                                    'open("out.json", "w").write(__import__("json").dumps(xs))'])
    p = subprocess.run([sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--run-nb-cells', str(nb)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / 'out.json').read_text()) == [1, 2]   # cuda/slow/eval:false skipped, magics dropped
    p = subprocess.run([sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--run-nb-cells', str(nb),
                        '--flags', 'cuda slow'], capture_output=True, text=True, timeout=120)
    assert json.loads((tmp_path / 'out.json').read_text()) == [1, 'cuda', 'slow', 2]
    bad = _nb(tmp_path / 'bad.ipynb', ['x = 1', 'assert x == 2, "x is not 2"'])
    p = subprocess.run([sys.executable, str(REPO / 'scripts' / 'gpu_check.py'), '--run-nb-cells', str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and 'x is not 2' in p.stderr and 'cell 1 failed' in p.stderr


def test_cuda_notebooks_found():
    names = [nb.name for nb in gc.cuda_notebooks()]
    assert 'A3_perf.ipynb' in names


def test_section_timeout_kills_and_others_run(tmp_path):
    c = gc.Ctx(tmp_path, smoke=True)
    slow = gc.Section('slow', 'x', 'sleeps', 60, 6, lambda c: [('sleep', [sys.executable, '-c',
                      'import subprocess, sys, time; subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); time.sleep(60)'])])
    fail = gc.Section('fail', 'x', 'fails', 60, 30, lambda c: [('boom', [sys.executable, '-c', 'raise ValueError("boom here")'])])
    fine = gc.Section('fine', 'x', 'works', 60, 30, lambda c: [('ok', [sys.executable, '-c', 'print(1)'])],
                      keys=lambda c: dict(answer=42))
    env, deadline = gc.section_env(True), time.perf_counter() + 100
    t0 = time.perf_counter()
    r = gc.run_section(slow, c, deadline, env)
    assert r['status'] == 'timeout' and time.perf_counter() - t0 < 25
    r = gc.run_section(fail, c, deadline, env)
    assert r['status'] == 'fail' and 'boom here' in r['keys']['last_error']
    r = gc.run_section(fine, c, deadline, env)
    assert r['status'] == 'ok' and r['keys'] == dict(answer=42)
    r = gc.run_section(fine, c, time.perf_counter() + 1, env)           # budget spent: skipped, not run
    assert r['status'] == 'skip' and 'budget' in r['keys']['reason']
