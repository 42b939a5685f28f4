"""RMSNorm forward + backward on CPU: qwen_edu's `RMSNorm` (PyTorch's fused `F.rms_norm` on the float32 input, cast back,
then the weight) against the step-by-step formula (chapter 04a's `rms_norm_naive`) and transformers' `Qwen2RMSNorm`
(the anchor, the same step-by-step arithmetic), same input and weight, interleaved repeats in one process.
Usage: python bench/bench_layers.py [--repeats 15] [--threads 1] [--out ...]"""
import argparse, os, platform, statistics, time
from pathlib import Path
import torch
import transformers
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from qwen_edu.layers import RMSNorm


def rms_norm_naive(x, weight, eps=1e-6):
    "Chapter 04a's formula, step by step, in float32, cast back before the weight."
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--iters', type=int, default=20, help='forward + backward passes per timed run')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--shapes', default='8x256x256,8x256x896', help='batch x seq x hidden, comma separated')
    p.add_argument('--out', default=str(Path(__file__).parent / 'results_layers.md'))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lines, load0 = [], os.getloadavg()[0]
    for shape in a.shapes.split(','):
        B, T, H = map(int, shape.split('x'))
        g = torch.Generator().manual_seed(0)
        x0, w0, dy = torch.randn(B, T, H, generator=g), torch.rand(H, generator=g) + 0.5, torch.randn(B, T, H, generator=g)
        ours, hf = RMSNorm(H, eps=1e-6), Qwen2RMSNorm(H, eps=1e-6)
        with torch.no_grad(): ours.weight.copy_(w0); hf.weight.copy_(w0)
        w_naive = w0.clone().requires_grad_(True)
        fns = {'qwen_edu RMSNorm (fused F.rms_norm)': lambda x: ours(x),
               'step-by-step formula (rms_norm_naive)': lambda x: rms_norm_naive(x, w_naive),
               'transformers Qwen2RMSNorm': lambda x: hf(x)}
        params = {'qwen_edu RMSNorm (fused F.rms_norm)': ours.weight, 'step-by-step formula (rms_norm_naive)': w_naive,
                  'transformers Qwen2RMSNorm': hf.weight}

        def run(name, n):
            for _ in range(n):
                x = x0.detach().requires_grad_(True); params[name].grad = None
                y = fns[name](x); y.backward(dy)
            return y.detach(), x.grad, params[name].grad

        outs = {n: run(n, 1) for n in fns}  # warm-up, and the three agree
        ref = outs['transformers Qwen2RMSNorm']
        for n, o in outs.items():
            for u, v in zip(o, ref): assert torch.allclose(u, v, atol=1e-4, rtol=1e-4), n
        times, cpu = {n: [] for n in fns}, {n: [] for n in fns}
        for _ in range(a.repeats):
            for n in fns:
                t0, c0 = time.perf_counter(), time.process_time(); run(n, a.iters)
                times[n].append((time.perf_counter() - t0) / a.iters); cpu[n].append((time.process_time() - c0) / a.iters)
        med = {n: statistics.median(t) for n, t in times.items()}
        cmed = {n: statistics.median(t) for n, t in cpu.items()}
        form = 'step-by-step formula (rms_norm_naive)'
        base = med['transformers Qwen2RMSNorm']
        lines += [f"### {B} x {T} tokens x hidden {H}", '',
                  '| implementation | us / fwd+bwd (median) | min | max | speed vs transformers | speed vs formula | CPU us (speed vs formula) |',
                  '|---|---|---|---|---|---|---|']
        lines += [f"| {n} | {med[n] * 1e6:.0f} | {min(times[n]) * 1e6:.0f} | {max(times[n]) * 1e6:.0f} | "
                  f"{base / med[n]:.2f}x | {med[form] / med[n]:.2f}x | {cmed[n] * 1e6:.0f} ({cmed[form] / cmed[n]:.2f}x) |" for n in fns]
        lines.append('')
        print('\n'.join(lines[-6:]), flush=True)
    load1 = os.getloadavg()[0]
    md = '\n'.join([
        '# RMSNorm forward + backward, CPU', '',
        f"float32 input, weight and upstream gradient fixed by seed; one timed run = {a.iters} forward + backward passes "
        f"(input and weight gradients); median of {a.repeats} interleaved runs. Outputs and both gradients agree to 1e-4.",
        '',
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}), transformers "
        f"{transformers.__version__}; load average {load0:.1f} -> {load1:.1f} (a shared machine: compare the ratios).",
        '', *lines])
    Path(a.out).write_text(md)
    print(f"wrote {a.out}")


if __name__ == '__main__':
    main()
