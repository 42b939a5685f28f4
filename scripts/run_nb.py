"""Execute notebooks in place and keep their outputs (the chapters are committed executed).

Cells flagged `#| slow`, `#| cuda` or `#| eval: false` are skipped and keep the outputs they have, unless their flag
is named in `--flags` (run a changed slow cell with `--flags slow`). Stops at the first error and writes nothing then.
Afterwards run `nbdev_clean` (scripts/check_sync.py does). Usage: `python scripts/run_nb.py nbs/10_train.ipynb [--flags slow]`.
"""
import argparse, os, re, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

_flag_re = re.compile(r'^\s*#\|\s*(.*)$')

def cell_flags(cell):
    "The `#|` directives of a code cell (e.g. {'slow', 'eval: false'})."
    out = set()
    for line in cell.source.splitlines():
        m = _flag_re.match(line)
        if m: out.add(m.group(1).strip())
        elif line.strip(): break
    return out

def run(path, flags=()):
    path = Path(path).resolve()
    nb = read_nb(path)
    sh = CaptureShell()
    sh.set_path(path.parent)
    cwd = os.getcwd(); os.chdir(path.parent)
    t0 = time.time()
    try:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            fl = cell_flags(cell)
            skip = [f for f in ('slow', 'cuda', 'eval: false') if f in fl and f not in flags]
            if skip: continue
            cell.outputs = []  # execnb keeps a cell's old outputs when the new run prints nothing
            sh.cell(cell)
            if sh.exc:
                print(f"{path.name}: cell {i} failed:\n{cell.source[:400]}\n", file=sys.stderr)
                raise sh.exc
    finally: os.chdir(cwd)
    write_nb(nb, path)
    print(f"{path.name}: executed in {time.time()-t0:.0f}s")

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('paths', nargs='+')
    p.add_argument('--flags', default='', help="space-separated flags to run too, e.g. 'slow'")
    a = p.parse_args()
    for f in a.paths: run(f, set(a.flags.split()))
