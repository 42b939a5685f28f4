"""Decode tokens/s: `qwen_edu.generate.generate` against transformers `generate`, same random-weight model.

The model is built from a preset with our code, then converted to a transformers `Qwen2ForCausalLM` through
`qwen_edu.hf` (config_to_hf + state_dict_to_hf), so both decode with the same weights. Same prompt batch (equal
lengths, no padding), greedy, the same number of new tokens (no stop token; transformers gets min_new_tokens), both
in `--dtype` on `--device`, clocks read after a device sync (qwen_edu.perf.SyncTimer). Reported: each side's new
tokens/s (median of --repeats, interleaved), ours / transformers, and the fraction of generated tokens that agree.

    python bench/gpu/bench_decode.py                    # CUDA, edu-small, bf16, batch 8, 64-token prompts, 128 new
    python bench/gpu/bench_decode.py --smoke            # CPU, tiny model, fp32: checks the script runs
"""
import argparse, json, platform, statistics, sys
import torch
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.generate import generate
from qwen_edu.hf import config_to_hf, state_dict_to_hf
from qwen_edu.perf import SyncTimer, device_name

SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
DTYPES = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='edu-small')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--prompt-len', type=int, default=64)
    p.add_argument('--new-tokens', type=int, default=128)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--dtype', default=None, choices=list(DTYPES), help='default: bf16 on CUDA, fp32 on the CPU')
    p.add_argument('--device', default=None, help='default: cuda (cpu with --smoke)')
    p.add_argument('--smoke', action='store_true', help='tiny model on the CPU, few tokens (for CI; numbers meaningless)')
    p.add_argument('--json', default=None, help='also write the result to this file')
    return p.parse_args(argv)


def hf_twin(model, cfg, device, dtype):
    "A transformers Qwen2ForCausalLM holding `model`'s weights."
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hc = Qwen2Config(**config_to_hf(cfg))
    hf = Qwen2ForCausalLM(hc)
    sd = state_dict_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == 'lm_head.weight')]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings: hf.tie_weights()
    hf.generation_config.eos_token_id = None; hf.generation_config.pad_token_id = 0
    return hf.to(device=device, dtype=dtype).eval()


def main(argv=None):
    a = parse(argv)
    if a.smoke: a.batch, a.prompt_len, a.new_tokens, a.repeats = 2, 8, 8, 1
    device = torch.device(a.device or ('cpu' if a.smoke else 'cuda'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("no GPU visible: this benchmark needs one (use --smoke to test it on the CPU)")
    dtype = DTYPES[a.dtype or ('bf16' if device.type == 'cuda' else 'fp32')]
    cfg = QwenConfig.from_preset(a.preset, **(SMOKE_MODEL if a.smoke else {}))
    if a.prompt_len + a.new_tokens > cfg.max_position_embeddings:
        sys.exit(f"--prompt-len + --new-tokens ({a.prompt_len + a.new_tokens}) exceed the preset's context "
                 f"({cfg.max_position_embeddings})")
    torch.manual_seed(0)
    ours = QwenForCausalLM(cfg).eval()
    hf = hf_twin(ours, cfg, device, dtype)
    ours = ours.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run_ours(n):
        return torch.tensor(generate(ours, ids, max_new_tokens=n, stop_tokens=None))

    @torch.inference_mode()
    def run_hf(n):
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        return out[:, a.prompt_len:].cpu()

    run_ours(4); run_hf(4)  # warm-up: kernels, allocator
    t_ours, t_hf, toks = [], [], {}
    for _ in range(a.repeats):
        with SyncTimer(device) as t: toks['ours'] = run_ours(a.new_tokens)
        t_ours.append(t.seconds)
        with SyncTimer(device) as t: toks['hf'] = run_hf(a.new_tokens)
        t_hf.append(t.seconds)
    n_new = a.batch * a.new_tokens
    ours_tps, hf_tps = n_new / statistics.median(t_ours), n_new / statistics.median(t_hf)
    same = toks['ours'].shape == toks['hf'].shape
    agree = float((toks['ours'] == toks['hf']).float().mean()) if same else 0.0
    res = dict(preset=a.preset, params=cfg.num_params(), device=device_name(device) if device.type == 'cuda' else
               (platform.processor() or 'cpu'), dtype=str(dtype).removeprefix('torch.'), batch=a.batch,
               prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeats=a.repeats,
               ours_tokens_per_s=round(ours_tps, 1), hf_tokens_per_s=round(hf_tps, 1), ratio=ours_tps / hf_tps,
               token_agreement=agree, torch=torch.__version__, smoke=a.smoke)
    try:
        import transformers; res['transformers'] = transformers.__version__
    except ImportError: pass
    print(json.dumps(res))
    print(f"| {a.preset} | {res['device']} | {res['dtype']} | {a.batch}x({a.prompt_len}+{a.new_tokens}) | "
          f"{ours_tps:,.0f} | {hf_tps:,.0f} | {ours_tps / hf_tps:.2f}x | {agree:.0%} |")
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=1)
    return res


if __name__ == '__main__':
    main()
