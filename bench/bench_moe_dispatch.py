"""MoE expert dispatch on CPU, training step (forward + backward): qwen_edu's `grouped` (default), `padded` (zero-padded
`bmm`) and `loop` dispatches, and transformers' Qwen2MoeForCausalLM with its default experts implementation as the
anchor, same config and weights, interleaved repeats in one process. The config is bench_moe.py's.
Usage: python bench/bench_moe_dispatch.py [--repeats 7] [--threads 1] [--out ...]"""
import argparse, os, platform, statistics, time, warnings
from pathlib import Path
import torch
import transformers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.hf import from_hf, config_to_hf
from qwen_edu.moe import moe_blocks
from bench_moe import CFG, interleaved_runs  # the same MoE shape as the main MoE bench (bench/ is on sys.path when run as a script)

transformers.logging.set_verbosity_error()
warnings.filterwarnings('ignore')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--seq', type=int, default=128)
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: least disturbed by a shared machine)')
    p.add_argument('--out', default=str(Path(__file__).parent / 'results_moe_dispatch.md'))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = QwenConfig(**CFG)
    torch.manual_seed(0)
    hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**config_to_hf(cfg))).train()
    hf_default = hf.config._experts_implementation
    models = {}
    for d in ('grouped', 'padded', 'loop'):
        m = from_hf(hf).train()
        for b in moe_blocks(m): b.dispatch = d
        models[d] = m
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))

    def ours_step(m):
        m.zero_grad(set_to_none=True)
        out = m(x, labels=x); out.loss.backward()
        return out.loss.item()

    def hf_step():
        hf.zero_grad(set_to_none=True)
        out = hf(x, labels=x, output_router_logits=True); out.loss.backward()
        return out.loss.item()

    names = {'grouped': 'qwen_edu grouped (default)', 'padded': 'qwen_edu padded bmm', 'loop': 'qwen_edu loop'}
    runs = {names[d]: (lambda m=m: ours_step(m)) for d, m in models.items()}
    anchor = f'transformers ({hf_default}, its default)'
    runs[anchor] = hf_step
    losses = {n: f() for n, f in runs.items()}  # warm-up; all four compute the same loss
    ref = losses[names['grouped']]
    for n, l in losses.items(): assert abs(l - ref) < 1e-4, (n, l, ref)
    load0 = os.getloadavg()[0]
    times, cpu = interleaved_runs(runs, a.repeats)
    load1 = os.getloadavg()[0]
    med = {n: statistics.median(t) for n, t in times.items()}
    cmed = {n: statistics.median(t) for n, t in cpu.items()}
    g, pad = med[names['grouped']], med[names['padded']]
    cg, cpad = cmed[names['grouped']], cmed[names['padded']]
    ntok = a.batch * a.seq
    rows = [f"| {n} | {med[n] * 1e3:.0f} | {min(times[n]) * 1e3:.0f} | {max(times[n]) * 1e3:.0f} | {ntok / med[n]:,.0f} | "
            f"{med[n] / g:.2f}x | {med[anchor] / med[n]:.2f}x | {cmed[n] * 1e3:.0f} ({cmed[n] / cg:.2f}x) |" for n in runs]
    md = '\n'.join([
        '# MoE expert dispatch: grouped vs padded `bmm` vs loop (training step, CPU)',
        '',
        f"Config (bench_moe.py's): hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers (all sparse), "
        f"{cfg.num_experts} routed experts of {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, one shared "
        f"expert of {cfg.shared_expert_intermediate_size}, vocab {cfg.vocab_size}; batch {a.batch} x {a.seq} = {ntok} "
        f"tokens, float32, forward + backward. Same weights in every model, losses equal to 1e-4 ({ref:.5f}). "
        f"Median of {a.repeats} interleaved repeats after one warm-up; min and max shown.",
        '',
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}), transformers "
        f"{transformers.__version__}; load average {load0:.1f} -> {load1:.1f} (a shared machine: compare the ratios).",
        '',
        '| dispatch | ms / step (median) | min | max | tokens/s | time vs grouped | speed vs transformers default | CPU ms / step (vs grouped) |',
        '|---|---|---|---|---|---|---|---|',
        *rows,
        '',
        f"**padded `bmm` / grouped: {pad / g:.2f}x the time** ({cpad / cg:.2f}x the CPU time; every expert is padded to the busiest expert's count, "
        f"and the padding rows are computed and back-propagated too).",
        ''])
    print(md)
    Path(a.out).write_text(md)


if __name__ == '__main__':
    main()
