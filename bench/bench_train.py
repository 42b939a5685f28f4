"""Training throughput (tokens/s) on the CPU: the full trainer `qwen_edu.train.train` vs a bare loop over the same
model, vs a bare loop over transformers' Qwen2ForCausalLM (sdpa) with the same config, interleaved in one process.

The trainer's figure is what it logs in metrics.jsonl (median over the timed steps; the first step is dropped); the
bare loops time forward + loss + backward + clip + AdamW step on the same batch shape. The ratio trainer / bare
qwen_edu is the trainer's overhead (batch sampling, logging); bare qwen_edu / bare transformers compares the models.

Usage: python bench/bench_train.py [--presets edu-tiny,edu-small] [--repeats 5] [--steps 3] [--batch 4] [--seq 128]
Writes bench/results_train.md.
"""
import argparse, json, os, platform, statistics, tempfile, time
from pathlib import Path
import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.data import write_shards, RandomBatches
from qwen_edu.model import QwenForCausalLM
from qwen_edu.train import TrainConfig, train, read_metrics, make_optimizer, lm_loss


def hf_model(cfg):
    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
                     tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation='sdpa')
    return Qwen2ForCausalLM(hc).train()


def bare_loop_tps(model, batches, steps, tcfg):
    "Median tokens/s of forward + loss + backward + clip + AdamW over `steps` timed steps (after 1 untimed)."
    opt = make_optimizer(model, tcfg); times = []
    for i in range(steps + 1):
        x, y = batches.batch(i)
        t0 = time.perf_counter()
        loss = lm_loss(model(x), y); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        if i: times.append(time.perf_counter() - t0)
    return x.numel() / statistics.median(times)


def trainer_tps(data, out, preset, steps, batch, seq):
    r = train(TrainConfig(preset=preset, data=str(data), out=str(out), max_steps=steps + 1, warmup_steps=1,
                          batch_size=batch, seq_len=seq, log_every=1, eval_every=10**6, eval_batches=1,
                          ckpt_every=10**6, progress=False))
    return statistics.median(m['tokens_per_s'] for m in read_metrics(out / 'metrics.jsonl')[1:])


def main():
    p = argparse.ArgumentParser(); p.add_argument('--presets', default='edu-tiny,edu-small')
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--steps', type=int, default=3)
    p.add_argument('--batch', type=int, default=4); p.add_argument('--seq', type=int, default=128)
    p.add_argument('--out', default=str(Path(__file__).parent / 'results_train.md'))
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp()); rng = np.random.default_rng(0)
    write_shards(tmp / 'data', {'train': rng.integers(0, 8192, 200_000), 'val': rng.integers(0, 8192, 20_000)},
                 vocab_size=8192, eos_id=0)
    from qwen_edu.data import open_tokens
    batches = RandomBatches(open_tokens(tmp / 'data', 'train'), a.batch, a.seq, 0)
    rows, load0 = [], os.getloadavg()[0]
    for preset in a.presets.split(','):
        cfg = QwenConfig.from_preset(preset, vocab_size=8192)
        res = {'qwen_edu.train (full trainer)': [], 'qwen_edu model, bare loop': [], 'transformers Qwen2, bare loop': []}
        for rep in range(a.repeats):  # interleaved: each repeat runs all three
            torch.manual_seed(rep)
            res['qwen_edu.train (full trainer)'].append(trainer_tps(tmp / 'data', tmp / f'{preset}_{rep}', preset, a.steps, a.batch, a.seq))
            res['qwen_edu model, bare loop'].append(bare_loop_tps(QwenForCausalLM(cfg).train(), batches, a.steps, TrainConfig()))
            res['transformers Qwen2, bare loop'].append(bare_loop_tps(hf_model(cfg), batches, a.steps, TrainConfig()))
            print(preset, rep, {k: round(v[-1]) for k, v in res.items()}, flush=True)
        ref = statistics.median(res['transformers Qwen2, bare loop'])
        for k, v in res.items():
            rows.append((preset, f"{cfg.num_params()/1e6:.1f}M", k, statistics.median(v), statistics.median(v) / ref))
    cond = (f"CPU `{platform.processor() or platform.machine()}`, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, fp32, batch {a.batch} x seq {a.seq}, vocab 8192, "
            f"median of {a.repeats} interleaved repeats x {a.steps} timed steps, load average {load0:.1f} -> "
            f"{os.getloadavg()[0]:.1f} (shared machine: compare ratios, not absolute numbers)")
    md = ["# Training throughput (CPU)", "", cond, "",
          "| preset | params | implementation | tokens/s (median) | ratio vs transformers |", "|---|---|---|---|---|"]
    md += [f"| {a_} | {b} | {c} | {d:,.0f} | {e:.2f} |" for a_, b, c, d, e in rows]
    Path(a.out).write_text('\n'.join(md) + '\n')
    print('\n'.join(md))


if __name__ == '__main__':
    main()
