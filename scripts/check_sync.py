"""Fail when the notebooks and the package disagree, or when a notebook carries unstripped metadata.

Runs `nbdev_export` and `nbdev_clean` and reports every file they changed. In a clean checkout both must be
no-ops: `qwen_edu/*.py` is generated from `nbs/*.ipynb` and is never edited by hand.
"""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def snapshot(folder, pattern):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root/folder).rglob(pattern))
            if '.ipynb_checkpoints' not in p.parts and '__pycache__' not in p.parts}

def changed(before, after):
    return sorted(str(p.relative_to(root)) for p in set(before) | set(after) if before.get(p) != after.get(p))

def run(cmd):
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")

problems = []
before = snapshot('qwen_edu', '*.py')
run(['nbdev_export'])
diff = changed(before, snapshot('qwen_edu', '*.py'))
if diff:
    problems.append("nbdev_export changed " + ", ".join(diff) + ":\n  the package was out of sync with the notebooks."
                    "\n  Fix the notebook (never qwen_edu/*.py by hand), run nbdev_export, and commit both.")
before = snapshot('nbs', '*.ipynb')
run(['nbdev_clean'])
diff = changed(before, snapshot('nbs', '*.ipynb'))
if diff:
    problems.append("nbdev_clean changed " + ", ".join(diff) + ":\n  notebooks carried unstripped metadata."
                    "\n  Run nbdev_clean and commit the cleaned notebooks.")
if problems:
    print("SYNC CHECK FAILED\n" + "\n".join(problems), file=sys.stderr)
    sys.exit(1)
print("sync check: notebooks, package and metadata agree")
