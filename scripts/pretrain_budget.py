"""How much pre-training does the pipeline's model need before it writes Python? (chapter 16, "Does it write Python?")

Runs the pipeline's tokenizer, data, pretrain and sample stages for a few (model, steps) points on the same corpus and
task text as `qwen-edu pipeline` (the main job), and writes each point's pre-training figures and its held-out code
measurement (the sample stage's `code` block) to data/pipeline/pretrain_budget.json.

    python scripts/pretrain_budget.py                      # every point, runs in runs/budget/<name> (about 35 minutes on 2 cores)
    python scripts/pretrain_budget.py --only tiny-400       # one point
Finished stages are skipped (the pipeline's done.json), so an interrupted call resumes.
"""
import argparse, json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qwen_edu.pipeline import PipelineConfig, run_pipeline

MINI = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)  # 1.8M parameters
POINTS = {  # name -> (pre-training steps, model shape over edu-tiny); level-1 task text, as the pipeline's default
    'tiny-400': (400, None),      # the first recipe's pre-training (edu-tiny, 4.9M parameters)
    'mini-850': (850, MINI),      # edu-mini's shape (1.8M): about the same CPU time as tiny-400
    'mini-1500': (1500, MINI),    # a little more than the pipeline's 1,400 steps
    'tiny-1600': (1600, None),    # 4x the first recipe's steps
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default='runs/budget', help='directory of the runs')
    p.add_argument('--only', default=','.join(POINTS), help='comma-separated points')
    p.add_argument('--out', default=str(Path(__file__).resolve().parent.parent / 'data' / 'pipeline' / 'pretrain_budget.json'))
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = json.loads(out.read_text()) if out.exists() else {}
    for name in a.only.split(','):
        steps, shape = POINTS[name]
        cfg = PipelineConfig(out=str(Path(a.runs) / name), stages='tokenizer,data,pretrain,sample', max_steps=steps,
                             train_overrides=shape, levels='1', progress=False)
        t0 = time.perf_counter()
        ctx = run_pipeline(cfg)
        pre, code = ctx['pretrain'], ctx['sample']['code']
        rows[name] = dict(steps=steps, params=pre['params'], tokens=steps * cfg.batch_size * cfg.seq_len,
                          pretrain_seconds=pre['seconds'], tokens_per_s=pre['tokens_per_s'], val_loss=pre['val_loss'],
                          val_bpb=pre['val_bpb'], code=code, sample=ctx['sample']['text'],
                          recorded=time.strftime('%Y-%m-%d'), call_seconds=round(time.perf_counter() - t0, 1))
        out.write_text(json.dumps(rows, indent=1) + '\n')
        g = code['gap']
        print(f"{name}: val loss {pre['val_loss']:.3f}, python lines {code['python_lines']:.3f} vs real "
              f"{code['reference_python_lines']:.3f} ({g['delta']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}])", flush=True)


if __name__ == '__main__':
    main()
