"""Training throughput and MFU of edu-base on one GPU: bf16 autocast, optional torch.compile, fused AdamW.

MFU = tokens/s * flops_per_token / peak, with flops_per_token = QwenConfig.flops_per_token(seq_len) (6N + the
attention term) and peak the GPU's dense bf16 FLOP/s (H100/H200: 989e12; see qwen_edu.train.PEAK_BF16_FLOPS).
Target on an H100/H200: >= 40%.

    python bench/gpu/bench_mfu.py --compile                 # edu-base, batch 16 x 2048, 20 timed steps
    python bench/gpu/bench_mfu.py --smoke                   # CPU, tiny model, 2 steps: checks the script runs
Writes a JSON line to stdout (and --json PATH), plus a markdown table row.
"""
import argparse, json, os, platform, sys, time
import torch
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.train import TrainConfig, apply_compile, autocast_for, make_optimizer, lm_loss, peak_flops

SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='edu-base'); p.add_argument('--batch', type=int, default=16)
    p.add_argument('--seq', type=int, default=2048); p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation, allocator)')
    p.add_argument('--compile', action='store_true'); p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'])
    p.add_argument('--peak-flops', type=float, default=None, help='override the peak FLOP/s (default: by GPU name)')
    p.add_argument('--smoke', action='store_true', help='tiny model on the CPU, 2 steps (for CI; numbers meaningless)')
    p.add_argument('--json', default=None, help='also write the result to this file')
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    if a.smoke: a.batch, a.seq, a.steps, a.warmup, a.dtype = 2, 32, 2, 1, 'fp32'
    device = torch.device('cuda' if torch.cuda.is_available() and not a.smoke else 'cpu')
    if device.type == 'cpu' and not a.smoke: sys.exit("no GPU visible: this benchmark needs one (use --smoke to test it on the CPU)")
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    cfg = QwenConfig.from_preset(a.preset, max_position_embeddings=max(a.seq, 32), **(SMOKE_MODEL if a.smoke else {}))
    torch.manual_seed(0)
    model = QwenForCausalLM(cfg).to(device).train()
    opt = make_optimizer(model, TrainConfig(lr=3e-4))
    fwd = apply_compile(model) if a.compile else model
    autocast = lambda: autocast_for(device, a.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with autocast(): out = fwd(inp)
        loss = lm_loss(out, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(a.warmup): step()
    sync(); t0 = time.perf_counter()
    for _ in range(a.steps): loss = step()
    sync(); dt = time.perf_counter() - t0
    tps = a.batch * a.seq * a.steps / dt
    fpt = cfg.flops_per_token(a.seq)
    peak = a.peak_flops or peak_flops(device)
    res = dict(preset=a.preset, params=cfg.num_params(), batch=a.batch, seq=a.seq, steps=a.steps, dtype=a.dtype,
               compile=a.compile, device=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu',
               tokens_per_s=round(tps, 1), flops_per_token=fpt, achieved_tflops=round(tps * fpt / 1e12, 3),
               peak_tflops=None if peak is None else peak / 1e12, mfu=None if peak is None else tps * fpt / peak,
               final_loss=float(loss.detach()), torch=torch.__version__, smoke=a.smoke)
    print(json.dumps(res))
    mfu = 'n/a' if res['mfu'] is None else f"{res['mfu']:.1%}"
    print(f"| {a.preset} | {res['device']} | {a.batch}x{a.seq} | {a.dtype} | {a.compile} | {tps:,.0f} | "
          f"{res['achieved_tflops']:.1f} | {mfu} |")
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
