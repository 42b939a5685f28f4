"""The post-training trials behind the pipeline's defaults (chapter 16, "What it took"): each trial re-runs SFT, DPO,
GRPO and the evaluation of the main job on the pre-trained model of a finished run, with some PipelineConfig fields
changed, and records its held-out accuracies, paired changes and DPO's preference accuracy.

    python scripts/post_training_trials.py --base runs/edu-mini --out data/pipeline/dpo_pairs_trials.json

Each trial runs in runs/trials/<name> (the base run's tokenizer, data and pre-training are reused, not copied).
About three minutes a trial on a 2-core CPU."""
import argparse, json, shutil, sys, time
from pathlib import Path
from qwen_edu.pipeline import PipelineConfig, run_pipeline

TRIALS = {  # name -> PipelineConfig fields that differ from the defaults
    'sft160 sampled 1e-5': dict(post_training_steps={'sft': 160}, dpo_pairs='sampled', dpo_lr=1e-5),
    'sft160 own 2e-5': dict(post_training_steps={'sft': 160}),
    'sft120 sampled 1e-5': dict(dpo_pairs='sampled', dpo_lr=1e-5),
    'sft120 sampled 2e-5': dict(dpo_pairs='sampled'),
    'sft120 own 2e-5': dict(),
    'sft140 own 2e-5': dict(post_training_steps={'sft': 140}),
    'sft120 own 2e-5 seed 1': dict(seed=1),
    'sft120 own 2e-5 seed 2': dict(seed=2),
}

COMPARE = [('sft120 sampled 1e-5', 'sft120 own 2e-5'), ('sft120 sampled 2e-5', 'sft120 own 2e-5')]  # same SFT model, same suite

def trial_dir(name): return Path('runs/trials') / name.replace(' ', '_')

def compare(a: str, b: str) -> dict:
    "Paired change from trial `a` to trial `b` of each post-trained model (the same suite: same seed)."
    from qwen_edu.eval import paired_difference
    sa, sb = (json.loads((trial_dir(n) / 'eval' / 'scores.json').read_text()) for n in (a, b))
    if sa['prompts'] != sb['prompts']: raise ValueError(f"{a!r} and {b!r} were scored on different suites")
    return {k: paired_difference(sa[k], sb[k]) for k in ('sft', 'dpo', 'grpo')}

def run_trial(base: Path, name: str, fields: dict) -> dict:
    run = trial_dir(name)
    if run.exists(): shutil.rmtree(run)
    for stage in ('tokenizer', 'data', 'pretrain'):  # finished stages the trial starts from
        (run / stage).mkdir(parents=True)
        shutil.copy(base / stage / 'done.json', run / stage / 'done.json')
    shutil.copy(base / 'data' / 'train_prompts.json', run / 'data' / 'train_prompts.json')  # checked against the suite
    cfg = PipelineConfig(out=str(run), stages='sft,dpo,grpo,eval', progress=False, **fields)
    t0 = time.perf_counter()
    ctx = run_pipeline(cfg)
    ev, dpo = ctx['eval'], ctx['dpo']
    return dict(config=dict(fields), seconds=round(time.perf_counter() - t0, 1),
                suite=ev['suite'], accuracy={k: {f: ev[k][f] for f in ('accuracy', 'ci95', 'n')} for k in ('base', 'sft', 'dpo', 'grpo')},
                changes=ev['changes'], dpo=dict(pairs=dpo.get('pairs'), train_prompts=dpo.get('train_prompts'),
                train_pairs=dpo['train_pairs'], pref_accuracy=[dpo['heldout_pref_accuracy_before'], dpo['heldout_pref_accuracy_after']],
                pref_accuracy_ci95=dpo.get('heldout_pref_accuracy_ci95')))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--base', default='runs/edu-mini', help='a finished pipeline run (its pre-training is reused)')
    p.add_argument('--out', default='data/pipeline/dpo_pairs_trials.json')
    p.add_argument('--trials', default=','.join(TRIALS), help='comma-separated trial names')
    a = p.parse_args(argv)
    base, out = Path(a.base), Path(a.out)
    if not (base / 'pretrain' / 'done.json').exists(): sys.exit(f"{base} has no finished pre-training; run `qwen-edu pipeline` first")
    res = json.loads(out.read_text()) if out.exists() else {}
    res.pop('compare', None)  # recomputed below from the trials' run directories
    for name in [n.strip() for n in a.trials.split(',')]:
        if name not in TRIALS: sys.exit(f"unknown trial {name!r}; choose from {list(TRIALS)}")
        res[name] = run_trial(base, name, TRIALS[name])
        res = {k: res[k] for k in [*TRIALS, *res] if k in res}  # in TRIALS order
        out.write_text(json.dumps(res, indent=1) + '\n')  # after each trial: an interrupted sweep keeps what it ran
        c = res[name]['changes']
        print(name, {k: round(v['accuracy'], 3) for k, v in res[name]['accuracy'].items()},
              {k: f"{v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for k, v in c.items()}, flush=True)
    res['compare'] = {f"{a} -> {b}": compare(a, b) for a, b in COMPARE
                      if all((trial_dir(n) / 'eval' / 'scores.json').exists() for n in (a, b))}
    out.write_text(json.dumps(res, indent=1) + '\n')
    for k, v in res['compare'].items(): print(k, {m: f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for m, d in v.items()})

if __name__ == '__main__': main()
