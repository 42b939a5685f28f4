"""Per-call overhead of the code sandbox (qwen_edu.tasks.run_python), against starting a bare interpreter.

    python bench/bench_sandbox.py [--n 50] [--out bench/results_sandbox.md]

Each of N rounds runs the trivial program `print(1)` three ways, interleaved (so load changes hit all three alike):
1. `run_python` (the bubblewrap backend: namespaces, uid 65534, read-only interpreter snapshot, seccomp, rlimits,
   audit hook; as root also the `unshare --user` step that maps the sandbox to host uid 65534);
2. the audit-hook-only runner it replaced (`_run_unsafe`: `python -I -S` + rlimits + audit hook, no isolation);
3. a bare `subprocess.run([python, '-I', '-c', 'print(1)'])`, the floor for any fresh-interpreter design.
Reports the median and p90 wall time in ms, the one-off setup (snapshot + probe) and the machine's load.
"""
import argparse, os, platform, statistics, subprocess, sys, time
from pathlib import Path

from qwen_edu import tasks


def pct(xs, q): return sorted(xs)[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=50)
    ap.add_argument('--out', default=str(Path(__file__).with_name('results_sandbox.md')))
    args = ap.parse_args()
    load0 = os.getloadavg()
    t0 = time.perf_counter(); backend = tasks.sandbox_backend(); setup = time.perf_counter() - t0
    if backend != 'bwrap': sys.exit(f"no bubblewrap sandbox here: {tasks._setup.get('why')}")
    ways = {'run_python (bwrap sandbox)': lambda: tasks.run_python("print(1)"),
            'audit-hook-only runner (before)': lambda: tasks._run_unsafe("print(1)", 5.0, 256, 65536, 0),
            'bare `python -I -c`': lambda: subprocess.run([sys.executable, '-I', '-c', 'print(1)'], capture_output=True)}
    for f in ways.values(): f()  # warm the page cache
    times = {k: [] for k in ways}
    for _ in range(args.n):
        for k, f in ways.items():
            t = time.perf_counter(); r = f(); times[k].append((time.perf_counter() - t) * 1000)
            out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode()
            assert out == "1\n", (k, r)
    load1 = os.getloadavg()
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.machine())
    bwrap = subprocess.run(['bwrap', '--version'], capture_output=True, text=True).stdout.strip()
    lines = ["# Code sandbox: per-call overhead", "",
             f"Machine: {cpu}, {os.cpu_count()} CPUs shared with other jobs, Linux {platform.release()}, "
             f"Python {platform.python_version()}, {bwrap}, running as uid {os.geteuid()}. "
             f"Load average {load0[0]:.1f} before, {load1[0]:.1f} after. "
             f"N={args.n} interleaved rounds of `print(1)`; wall time per call, including reading the output.", "",
             "| way | median ms | p90 ms | min ms |", "|---|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {statistics.median(v):.1f} | {pct(v, 0.9):.1f} | {min(v):.1f} |")
    base = statistics.median(times['bare `python -I -c`'])
    lines += ["", f"Sandbox overhead over a bare interpreter: "
              f"{statistics.median(times['run_python (bwrap sandbox)']) - base:.1f} ms median. "
              f"One-off setup per process (find bwrap, `ldd`, hard-link snapshot of the interpreter, probe): "
              f"{setup * 1000:.0f} ms.", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == '__main__':
    main()
