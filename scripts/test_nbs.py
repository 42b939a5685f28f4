"""Run every notebook under nbdev's test runner and print a `notebooks: N passed, N failed` line.

`nbdev_test` prints only `Success.`; this does the same work (same flags from settings.ini, same runner) and
reports counts and per-notebook times. Usage: `python scripts/test_nbs.py [--flags "slow"] [--path nbs/01*.ipynb]`.
"""
import argparse, os, sys, time
from pathlib import Path
from fastcore.parallel import parallel
from nbdev.config import get_config
from nbdev.doclinks import nbglob
from nbdev.test import test_nb

p = argparse.ArgumentParser()
p.add_argument('--path', default=None, help='notebook or glob (default: all of nbs/)')
p.add_argument('--flags', default='', help='space-separated flags to run that are normally skipped')
p.add_argument('--n_workers', type=int, default=None)
a = p.parse_args()

cfg = get_config()
files = [f.absolute() for f in sorted(nbglob(a.path, as_path=True)) if not f.name.startswith('_')]
if not files: sys.exit('no notebooks found')
n_workers = a.n_workers if a.n_workers is not None else min(os.cpu_count() or 1, 8)
os.chdir(cfg.nbs_path)
t0 = time.time()
results = parallel(test_nb, files, skip_flags=cfg.tst_flags.split(), force_flags=a.flags.split(),
                   n_workers=n_workers if len(files) > 1 else 0, basepath=cfg.config_path, pause=0.01)
passed, times = zip(*results)
for f, ok, t in sorted(zip(files, passed, times), key=lambda o: -o[2]):
    print(f"  {'ok  ' if ok else 'FAIL'} {f.name:32s} {t:6.1f}s")
npass = sum(passed)
print(f"notebooks ({time.time()-t0:.0f}s wall):")
print(f"notebooks: {npass} passed, {len(files)-npass} failed")
sys.exit(0 if npass == len(files) else 1)
