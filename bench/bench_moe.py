"""MoE training step (forward + backward) on CPU: qwen_edu (grouped dispatch, and its readable loop) vs
transformers' Qwen2MoeForCausalLM (its default experts implementation, grouped_mm in 5.x, and its 'eager' loop), same
config and weights, interleaved repeats. Usage: python bench/bench_moe.py [--repeats 5] [--threads 1] [--out ...]"""
import argparse, platform, statistics, time, warnings
from pathlib import Path
import torch
import transformers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.hf import from_hf, config_to_hf
from qwen_edu.moe import moe_blocks, DISPATCH

transformers.logging.set_verbosity_error()
warnings.filterwarnings('ignore')

CFG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=2, max_position_embeddings=512, rope_theta=1e4, tie_word_embeddings=False,
           num_experts=64, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=512)


def interleaved_runs(runs, repeats):
    """Wall and CPU seconds of every call of each of `runs` ({name: fn}), interleaved round by round so that a shared
    machine's drift hits every contender alike; prints each round."""
    times, cpu = {n: [] for n in runs}, {n: [] for n in runs}
    for r in range(repeats):
        for n, f in runs.items():
            t0, c0 = time.perf_counter(), time.process_time(); f()
            times[n].append(time.perf_counter() - t0); cpu[n].append(time.process_time() - c0)
        print(f"round {r + 1}/{repeats}: " + ', '.join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    return times, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: least disturbed by a shared machine)')
    p.add_argument('--seq', type=int, default=128)
    p.add_argument('--experts', type=int, default=CFG['num_experts'])
    p.add_argument('--out', default=str(Path(__file__).parent / 'results_moe.md'))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = QwenConfig(**{**CFG, 'num_experts': a.experts})
    torch.manual_seed(0)
    hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**config_to_hf(cfg))).train()
    hf_default = hf.config._experts_implementation
    ours = from_hf(hf).train()
    ours_loop = from_hf(hf).train()
    for b in moe_blocks(ours_loop): b.dispatch = 'loop'
    # the floor: the same step with the routed experts' work skipped (router, aux loss, shared expert, attention and
    # lm_head still run), i.e. what any expert dispatch at all would cost 0 ms against. Not a model: its loss differs.
    DISPATCH['_skip_experts'] = lambda h, weights, experts, ex, capacity: torch.zeros_like(h)
    ours_floor = from_hf(hf).train()
    for b in moe_blocks(ours_floor): b.dispatch = '_skip_experts'
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))

    def ours_step(m):
        m.zero_grad(set_to_none=True)
        out = m(x, labels=x); out.loss.backward()
        return out.loss.item()

    def hf_step(impl):
        def step():
            hf.set_experts_implementation(impl)
            hf.zero_grad(set_to_none=True)
            out = hf(x, labels=x, output_router_logits=True); out.loss.backward()
            return out.loss.item()
        return step

    runs = {'qwen_edu (grouped, default)': lambda: ours_step(ours), 'qwen_edu (loop)': lambda: ours_step(ours_loop),
            f'transformers ({hf_default}, its default)': hf_step(hf_default)}
    if hf_default != 'eager': runs['transformers (eager)'] = hf_step('eager')
    floor = 'floor: qwen_edu with routed experts skipped (not a model)'
    runs[floor] = lambda: ours_step(ours_floor)
    losses = {n: f() for n, f in runs.items()}  # warm-up, and the losses must agree
    ref = losses['qwen_edu (grouped, default)']
    for n, l in losses.items(): assert n == floor or abs(l - ref) < 1e-4, (n, l, ref)
    times, cpu = interleaved_runs(runs, a.repeats)
    med = {n: statistics.median(t) for n, t in times.items()}
    cmed = {n: statistics.median(t) for n, t in cpu.items()}
    ntok = a.batch * a.seq
    base = med[f'transformers ({hf_default}, its default)']
    cbase = cmed[f'transformers ({hf_default}, its default)']
    rows = [f"| {n} | {med[n] * 1e3:.0f} | {ntok / med[n]:,.0f} | {base / med[n]:.2f}x | "
            f"{med['qwen_edu (loop)'] / med[n]:.2f}x | {cmed[n] * 1e3:.0f} ({cbase / cmed[n]:.2f}x) |" for n in runs]
    md = '\n'.join([
        '# MoE training step (forward + backward), CPU',
        '',
        f"Config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers (all sparse), {cfg.num_experts} routed experts "
        f"of {cfg.moe_intermediate_size} (fine-grained), top-{cfg.num_experts_per_tok}, one shared expert of "
        f"{cfg.shared_expert_intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab "
        f"{cfg.vocab_size}, untied; batch {a.batch} x {a.seq} = {ntok} tokens, float32, loss = CE + 0.001 * aux. Same "
        f"weights in every model (losses agree to 1e-4; the floor row skips the routed experts, so its loss differs). Median of {a.repeats} interleaved repeats after one warm-up.",
        '',
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}; a shared, noisy machine: compare the ratios.",
        '',
        '| implementation | ms / step (wall) | tokens/s | vs transformers default | vs qwen_edu loop | CPU ms / step (vs default) |',
        '|---|---|---|---|---|---|',
        *rows, ''])
    print(md)
    Path(a.out).write_text(md)


if __name__ == '__main__':
    main()
