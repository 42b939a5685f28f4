"""Training-step throughput (forward + backward + AdamW) of qwen_edu's QwenForCausalLM vs transformers'
Qwen2ForCausalLM (attn_implementation="sdpa") on the same weights, interleaved in one process.

Usage: python bench/bench_train_step.py [--repeats 7] [--steps 3] [--batch 8] [--seq 256] [--threads N]
Writes bench/results_train_step.md (a markdown table with the conditions).
"""
import argparse, os, platform, statistics, time
from pathlib import Path
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM


def build(cfg: QwenConfig, seed=0):
    "A transformers model (sdpa) and ours with identical weights."
    torch.manual_seed(seed)
    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
                     tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation='sdpa')
    hf = Qwen2ForCausalLM(hc).train()
    ours = QwenForCausalLM(cfg).train()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def make_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    def step(ids):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def time_steps(step, ids, n):
    "(tokens per wall-clock second, tokens per CPU second of this process) over n steps."
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n): step(ids)
    return n * ids.numel() / (time.perf_counter() - t0), n * ids.numel() / (time.process_time() - c0)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--steps', type=int, default=3, help='optimizer steps per timed run')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq', type=int, default=256)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--out', default=str(Path(__file__).with_name('results_train_step.md')))
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    cfg = QwenConfig.from_preset('edu-tiny')  # hidden 256, 4 layers, 8/2 heads, intermediate 688, vocab 8192, tied
    hf, ours = build(cfg)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    steps = {'qwen_edu': make_step(ours), 'transformers': make_step(hf)}
    # identical first loss (same weights, same batch)
    l_ours, l_hf = steps['qwen_edu'](ids), steps['transformers'](ids)
    assert abs(l_ours - l_hf) < 1e-4, (l_ours, l_hf)
    for s in steps.values(): s(ids)  # warm-up
    res, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    load0 = os.getloadavg()[0]
    for r in range(a.repeats):  # interleaved, alternating order
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for k in order:
            w, c = time_steps(steps[k], ids, a.steps)
            res[k].append(w); cpu[k].append(c)
        print(f"run {r}: " + ", ".join(f"{k} {res[k][-1]:,.0f} tok/s" for k in steps), flush=True)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in res.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med['qwen_edu'] / med['transformers']
    ratio_cpu = med_cpu['qwen_edu'] / med_cpu['transformers']
    cond = (f"CPU `{platform.processor() or platform.machine()}`, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, fp32, batch {a.batch} x {a.seq} tokens, edu-tiny "
            f"(hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, "
            f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, tied), AdamW, "
            f"{a.repeats} interleaved runs of {a.steps} steps each, medians; {os.cpu_count()} CPUs, "
            f"load average {load0:.1f} -> {load1:.1f} during the run (shared machine)")
    md = ["# Training step: qwen_edu vs transformers", "", cond, "",
          "| model | median tok/s (wall) | min | max | median tok per CPU-second |", "|---|---|---|---|---|"]
    for k in steps:
        md.append(f"| {k} | {med[k]:,.0f} | {min(res[k]):,.0f} | {max(res[k]):,.0f} | {med_cpu[k]:,.0f} |")
    md += ["", f"**ratio qwen_edu / transformers: {ratio:.2f}x** wall-clock, {ratio_cpu:.2f}x per CPU-second "
           f"(transformers with `attn_implementation=\"sdpa\"`; first-step losses equal: {l_ours:.5f} vs {l_hf:.5f}). "
           "CPU-second throughput is the steadier number when other processes compete for the cores.", ""]
    Path(a.out).write_text("\n".join(md))
    print("\n".join(md))
    return ratio


if __name__ == '__main__':
    main()
