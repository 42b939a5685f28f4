"""Training throughput and MFU of edu-base on one GPU: bf16 autocast, optional torch.compile, fused AdamW.

MFU = tokens/s * flops_per_token / peak (qwen_edu.perf.mfu), with flops_per_token = QwenConfig.flops_per_token(seq)
(6N + the attention term) and peak the GPU's dense bf16 FLOP/s looked up by its exact name
(qwen_edu.perf.PEAK_BF16_FLOPS: H100 SXM / H200 989e12, H100 PCIe 756e12, ...) or --peak-flops. Steps are timed
after a device sync. The loss is the model's own (labels, chunked when it supports return_logits=False), the
optimizer fused AdamW without decay on norms and biases. Target on an H100/H200: >= 45%.

    python bench/gpu/bench_mfu.py --compile                 # edu-base, batch 16 x 2048, 20 timed steps
    python bench/gpu/bench_mfu.py --smoke                   # CPU, tiny model, 2 steps: checks the script runs
Writes a JSON line to stdout (and --json PATH), plus a markdown table row.
"""
import argparse, inspect, json, platform, sys
import torch
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.perf import SyncTimer, device_name, mfu, peak_flops, synchronize

SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='edu-base'); p.add_argument('--batch', type=int, default=16)
    p.add_argument('--seq', type=int, default=2048); p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation, allocator)')
    p.add_argument('--compile', action='store_true'); p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'])
    p.add_argument('--peak-flops', type=float, default=None, help='override the peak FLOP/s (default: by exact GPU name)')
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
    peak = peak_flops(device, a.peak_flops)  # checks --peak-flops; warns (with what to do) for an unknown GPU
    cfg = QwenConfig.from_preset(a.preset, max_position_embeddings=max(a.seq, 32), **(SMOKE_MODEL if a.smoke else {}))
    torch.manual_seed(0)
    model = QwenForCausalLM(cfg).to(device).train()
    groups = [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=0.1),
              dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), **(dict(fused=True) if device.type == 'cuda' else {}))
    fwd = torch.compile(model) if a.compile else model
    chunked = 'return_logits' in inspect.signature(model.forward).parameters
    kw = dict(return_logits=False) if chunked else {}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == 'bf16'):
            loss = fwd(x, labels=x, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(a.warmup): step()
    synchronize(device)
    with SyncTimer(device) as t:
        for _ in range(a.steps): loss = step()
    tps = a.batch * a.seq * a.steps / t.seconds
    fpt = cfg.flops_per_token(a.seq)
    m = mfu(tps, fpt, peak)
    res = dict(preset=a.preset, params=cfg.num_params(), batch=a.batch, seq=a.seq, steps=a.steps, dtype=a.dtype,
               compile=a.compile, chunked_loss=chunked,
               device=device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu',
               tokens_per_s=round(tps, 1), flops_per_token=fpt, achieved_tflops=round(tps * fpt / 1e12, 3),
               peak_tflops=None if peak is None else peak / 1e12, mfu=m, final_loss=float(loss.detach()),
               max_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == 'cuda' else None,
               torch=torch.__version__, smoke=a.smoke)
    print(json.dumps(res))
    print(f"| {a.preset} | {res['device']} | {a.batch}x{a.seq} | {a.dtype} | {a.compile} | {tps:,.0f} | "
          f"{res['achieved_tflops']:.1f} | {'n/a' if m is None else f'{m:.1%}'} |")
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
