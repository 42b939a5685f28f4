"""The end-to-end pipeline (qwen_edu.pipeline): stages run, resume by skipping finished ones, clear errors."""
import json
from pathlib import Path
import pytest
from qwen_edu.pipeline import PipelineConfig, run_pipeline, pipeline_cli, STAGES, format_report

TINY = '{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}'
SMALL = ['--stages', 'tokenizer,data,pretrain,sample', '--corpus-size', '200000', '--vocab-size', '512', '--max-steps', '6', '--batch-size', '4', '--seq-len', '32',
         '--warmup-steps', '1', '--eval-every', '3', '--eval-batches', '2', '--sample-tokens', '8', '--no-progress',
         '--train-overrides', TINY]


def test_pipeline_runs_every_stage_then_resumes_by_skipping(tmp_path, capsys):
    run = tmp_path / 'run'
    assert pipeline_cli(['--out', str(run), *SMALL]) == 0
    out = capsys.readouterr().out
    rep = json.loads((run / 'report.json').read_text())
    assert list(rep) == ['tokenizer', 'data', 'pretrain', 'sample']
    assert rep['tokenizer']['vocab_size'] == 512
    meta = json.loads((run / 'data' / 'meta.json').read_text())
    assert meta['vocab_size'] == 512 and Path(meta['tokenizer']).exists()
    p = rep['pretrain']
    assert p['steps'] == 6 and p['val_loss'] > 0 and p['val_bpb'] > 0 and p['unigram_loss'] > 0
    assert Path(p['plot']).exists() and 'bits/byte' in out and 'sample' in out and str(p['plot']) in out
    assert (run / 'pretrain' / 'metrics.jsonl').exists()
    for f in [run / 'report.json', *run.glob('*/done.json')]: strict_json(f)  # strict JSON everywhere
    # every stage finished: a second call skips them all; removing one stage's done.json reruns only that stage
    (run / 'sample' / 'done.json').unlink()
    before = (run / 'pretrain' / 'metrics.jsonl').read_text()
    assert pipeline_cli(['--out', str(run), *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.count('skipping') == 3 and '[sample] running' in out
    assert (run / 'pretrain' / 'metrics.jsonl').read_text() == before
    # pre-training finished: re-running it resumes a finished run, whose figures must still be strict JSON
    (run / 'pretrain' / 'done.json').unlink()
    assert pipeline_cli(['--out', str(run), *SMALL]) == 0
    for f in [run / 'report.json', *run.glob('*/done.json')]: strict_json(f)


def test_sample_measures_python_on_heldout_code(tmp_path, capsys):
    "The sample stage continues held-out code (validation documents, not in the pre-training tokens) and line-parses it."
    import numpy as np
    from qwen_edu.data import open_tokens
    from qwen_edu.tokenizer import BPETokenizer
    from qwen_edu.pipeline import code_continuations
    run = tmp_path / 'run'
    args = [a for a in SMALL]
    args[args.index('--corpus-size') + 1] = '1500000'  # enough documents that the 2% validation split holds code
    assert pipeline_cli(['--out', str(run), *args, '--task-fraction', '0.1']) == 0
    out = capsys.readouterr().out
    code = strict_json(run / 'report.json')['sample']['code']
    assert code['prompts'] == code['gap']['n'] > 0 and 0 <= code['python_lines'] <= 1 and 0 < code['reference_python_lines'] <= 1
    assert code['gap']['delta'] == pytest.approx(code['python_lines'] - code['reference_python_lines'])
    assert 'parse as Python' in out and 'parse as Python' in (run / 'report.md').read_text()
    tok = BPETokenizer.from_hf(run / 'tokenizer')
    train = tok.decode(np.asarray(open_tokens(run / 'data', 'train')).tolist())
    val = (run / 'data' / 'val.jsonl').read_text()
    pairs = code_continuations(run, tok, n=50, new_tokens=60)
    assert len(pairs) >= 10 and all(json.dumps(p + r)[1:-1] in val and p + r not in train for p, r in pairs)


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['pretrian'\]"):
        run_pipeline(PipelineConfig(out=str(tmp_path / 'r'), stages='tokenizer,pretrian'))
    assert not (tmp_path / 'r').exists()


def test_stages_are_named_explicitly_in_pipeline_order():
    "No import-time registration: the pipeline module lists its stages, and importing it needs no other module first."
    import subprocess, sys
    assert list(STAGES) == ['tokenizer', 'data', 'pretrain', 'sft', 'dpo', 'grpo', 'eval', 'sample']
    code = "import qwen_edu.pipeline as P, sys\nprint(','.join(P.STAGES))"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == 'tokenizer,data,pretrain,sft,dpo,grpo,eval,sample'


def test_rerunning_a_stage_makes_the_later_ones_stale(tmp_path, monkeypatch):
    import qwen_edu.pipeline as P
    calls = []
    def stage(name):
        def fn(cfg, ctx): calls.append(name); return {'n': len(calls)}
        return fn
    monkeypatch.setattr(P, 'STAGES', {k: stage(k) for k in ('a', 'b', 'c')})
    cfg = PipelineConfig(out=str(tmp_path / 'run'), stages='a,b')
    run_pipeline(cfg); assert calls == ['a', 'b']
    run_pipeline(cfg); assert calls == ['a', 'b']                 # all done: nothing runs
    (tmp_path / 'run' / 'a' / 'done.json').unlink()
    ctx = run_pipeline(PipelineConfig(out=str(tmp_path / 'run'), stages='a'))
    assert calls == ['a', 'b', 'a'] and 'b' not in ctx            # b was built from the old a: no longer reported
    assert (tmp_path / 'run' / 'b' / 'stale.json').exists()
    run_pipeline(cfg); assert calls == ['a', 'b', 'a', 'b']       # and it runs again when asked


# --- arguments are checked before any stage runs (issue #11, item 18) ---

def strict_json(path):
    "Parse `path` as strict JSON: NaN, Infinity and -Infinity (which json.dumps writes by default) are errors."
    def bad(c): raise ValueError(f"{path}: non-standard JSON constant {c}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


def test_unknown_preset_is_refused_before_the_tokenizer(tmp_path, capsys):
    run = tmp_path / 'run'
    assert pipeline_cli(['--preset', 'qwen2.5-8b', '--out', str(run)]) == 2
    err = capsys.readouterr().err
    assert "unknown --preset 'qwen2.5-8b'" in err and 'edu-tiny' in err and 'qwen2.5-72b' in err
    assert not run.exists()
    with pytest.raises(ValueError, match="unknown --preset 'nope'"):
        run_pipeline(PipelineConfig(preset='nope', out=str(run)))
    assert not run.exists()


def test_72b_is_refused_before_any_file_is_written(tmp_path, capsys, monkeypatch):
    import qwen_edu.config
    from qwen_edu.config import NotEnoughMemoryError
    run = tmp_path / 'run'
    with pytest.raises(NotEnoughMemoryError, match='pre-training qwen2.5-72b at batch 16 x 128 needs about'):
        run_pipeline(PipelineConfig(preset='qwen2.5-72b', out=str(run)))  # this machine's real memory
    assert not run.exists()
    monkeypatch.setattr(qwen_edu.config, 'available_memory', lambda device='cpu': 20e9)
    assert pipeline_cli(['--preset', 'qwen2.5-72b', '--batch-size', '8', '--seq-len', '1024', '--out', str(run)]) == 2
    err = capsys.readouterr().err
    assert 'pre-training qwen2.5-72b at batch 8 x 1024 needs about 2.02 TB (weights 281 GB, ' in err
    assert 'this machine has 20 GB available: choose a smaller --preset (edu-mini, edu-tiny, ' in err and 'edu-small' in err
    assert '--no-memory-check' in err and not run.exists()


def test_edu_tiny_passes_and_the_memory_check_can_be_skipped(tmp_path, monkeypatch):
    import qwen_edu.config
    from qwen_edu.pipeline import validate_pipeline
    run = tmp_path / 'run'
    v = validate_pipeline(PipelineConfig(preset='edu-tiny', out=str(run)))
    assert v['stages'][:3] == ['tokenizer', 'data', 'pretrain'] and 0 < v['memory']['total'] < 2e9
    assert not run.exists()  # validating writes nothing
    monkeypatch.setattr(qwen_edu.config, 'available_memory', lambda device='cpu': 1e6)
    with pytest.raises(MemoryError): validate_pipeline(PipelineConfig(preset='edu-tiny', out=str(run)))
    assert validate_pipeline(PipelineConfig(preset='edu-tiny', out=str(run), memory_check=False))['memory'] is None
    # nothing to train (pretrain not asked for): no memory check
    assert validate_pipeline(PipelineConfig(preset='edu-tiny', out=str(run), stages='tokenizer,data'))['memory'] is None


@pytest.mark.parametrize('kw, msg', [
    (dict(corpus_size=0), 'corpus_size must be an int >= 10000'),
    (dict(vocab_size=100), r'vocab_size must be an int >= 278'),
    (dict(max_steps=0), 'max_steps must be a positive int'),
    (dict(batch_size=-1), 'batch_size must be a positive int'),
    (dict(seq_len=0), 'seq_len must be a positive int'),
    (dict(sample_tokens=0), 'sample_tokens must be a positive int'),
    (dict(eval_batches=1.5), 'eval_batches must be a positive int'),
    (dict(max_steps=120, warmup_steps=120), r'warmup_steps \(120\) must be in \[0, max_steps=120\)'),
    (dict(lr=float('nan')), 'lr must be a finite number > 0'),
    (dict(lr=0.0), 'lr must be a finite number > 0'),
    (dict(sample_prompt=''), 'sample_prompt must be a non-empty string'),
    (dict(dpo_pairs='mine'), r"dpo_pairs must be one of \('own', 'sampled'\), got 'mine'; fix --dpo-pairs"),
    (dict(stages='tokenizer,,pretrian'), r"unknown stage\(s\) \['pretrian'\]"),
    (dict(train_overrides={'grad_acum': 2}), r"unknown --train-overrides field\(s\) \['grad_acum'\]"),
    (dict(train_overrides={'max_steps': 5}), r"--train-overrides sets 'max_steps'.*use --max-steps"),
    (dict(train_overrides={'hidden_size': 102}), 'divisible by num_attention_heads'),
    (dict(train_overrides={'schedule': 'linear'}), 'schedule must be'),
    (dict(train_overrides=[1, 2]), '--train-overrides must be a JSON object'),
    pytest.param(dict(device='cuda'), "--device 'cuda' but no GPU is visible",
                 marks=pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='a GPU is visible')),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, kw, msg):
    run = tmp_path / 'run'
    with pytest.raises(ValueError, match=msg): run_pipeline(PipelineConfig(out=str(run), **kw))
    assert not run.exists()


def test_bad_run_directory_is_refused(tmp_path, capsys):
    f = tmp_path / 'file'; f.write_text('x')
    with pytest.raises(ValueError, match='is not a directory'): run_pipeline(PipelineConfig(out=str(f)))
    with pytest.raises(ValueError, match='is not a directory'): run_pipeline(PipelineConfig(out=str(f / 'run')))
    assert pipeline_cli(['--out', str(f), '--max-steps', '0']) == 2
    assert 'error: max_steps must be a positive int' in capsys.readouterr().err and f.read_text() == 'x'


# --- every JSON file the pipeline writes is strict JSON (issue #11, item 5) ---

def test_done_and_report_json_are_strict_json_even_with_nan(tmp_path, monkeypatch):
    import qwen_edu.pipeline as P
    monkeypatch.setattr(P, 'STAGES', {'a': lambda cfg, ctx: {'loss': float('nan'), 'hi': float('inf'),
                                                             'nested': {'x': [1.0, float('-inf')]}, 'ok': 0.5}})
    run = tmp_path / 'run'
    ctx = run_pipeline(PipelineConfig(out=str(run), stages='a'))
    done = strict_json(run / 'a' / 'done.json')
    assert done['loss'] is None and done['hi'] is None and done['nested'] == {'x': [1.0, None]} and done['ok'] == 0.5
    assert strict_json(run / 'report.json')['a']['loss'] is None and ctx['a']['loss'] is None
    # a done.json written by an older version (with NaN) is read, and the report rewritten strictly
    (run / 'a' / 'done.json').write_text('{"loss": NaN, "seconds": 1.0}')
    run_pipeline(PipelineConfig(out=str(run), stages='a'))
    assert strict_json(run / 'report.json')['a']['loss'] is None


def test_default_warmup_fits_short_runs(tmp_path):
    "Without --warmup-steps a short run is accepted (min(20, max_steps // 6)); the main job keeps its 20 warmup steps."
    from qwen_edu.pipeline import validate_pipeline, pipeline_warmup, _pretrain_fields
    from qwen_edu.train import TrainConfig, check_train_config
    for steps, want in ((8, 1), (3, 0), (120, 20), (1000, 20)):
        cfg = PipelineConfig(out=str(tmp_path), max_steps=steps)
        validate_pipeline(cfg)
        assert pipeline_warmup(cfg) == want
        check_train_config(TrainConfig(**_pretrain_fields(cfg, data=str(tmp_path))))
    assert pipeline_warmup(PipelineConfig(max_steps=8, warmup_steps=2)) == 2


def test_float32_overflowing_lr_is_refused(tmp_path, capsys):
    "A finite --lr beyond float32 (the optimizer's type) is refused before any work, like a NaN one."
    from qwen_edu.pipeline import validate_pipeline
    run = tmp_path / 'run'
    for lr in (1e39, 3e38):
        with pytest.raises(ValueError, match='lr .*float32'): validate_pipeline(PipelineConfig(out=str(run), lr=lr))
    assert pipeline_cli(['--out', str(run), '--lr', '1e39']) == 2
    assert 'float32' in capsys.readouterr().err and not run.exists()
    with pytest.raises(ValueError, match='weight_decay.*float32'):
        validate_pipeline(PipelineConfig(out=str(run), train_overrides={'weight_decay': 1e39}))


def test_memory_check_reaches_pretraining(tmp_path):
    "--no-memory-check is passed on to the pre-training stage (whose train() checks memory too)."
    from qwen_edu.pipeline import pretrain_config, validate_pipeline
    ctx = {'data': {'data': str(tmp_path)}}
    assert pretrain_config(PipelineConfig(out=str(tmp_path)), ctx).memory_check is True
    assert pretrain_config(PipelineConfig(out=str(tmp_path), memory_check=False), ctx).memory_check is False
    with pytest.raises(ValueError, match="sets 'memory_check'.*--no-memory-check"):
        validate_pipeline(PipelineConfig(out=str(tmp_path / 'run'), train_overrides={'memory_check': False}))


def test_pipeline_under_torchrun_runs_every_stage_once(tmp_path):
    "2 processes (gloo): rank 0 builds the tokenizer and data, both train (pre-training and post-training with DDP),"
    " rank 0 writes every done.json and the report; the post-trained model is a checkpoint the sample stage reads."
    import os, subprocess, sys
    run = tmp_path / 'run'
    args = [a for a in SMALL]
    args[args.index('--stages') + 1] = 'tokenizer,data,pretrain,sft,dpo,grpo,eval,sample'
    args += ['--eval-prompts', '10', '--post-training-steps', '{"sft": 2, "dpo": 2, "grpo": 2}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    (run / 'pretrain').mkdir(parents=True); (run / 'pretrain' / 'metrics.jsonl').write_text('{}\n')  # a cut attempt
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        '-m', 'qwen_edu.pipeline', '--out', str(run), '--device', 'cpu', *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run / 'report.json').read_text())
    assert list(report) == ['tokenizer', 'data', 'pretrain', 'sft', 'dpo', 'grpo', 'eval', 'sample']
    assert all(report['eval'][m]['n'] == report['eval']['suite']['prompts'] for m in ('base', 'sft', 'dpo', 'grpo'))
    assert (run / 'report.md').exists()
    assert report['sft']['model_run'] and (run / 'grpo' / 'ckpt').is_dir() and 'task_answer' in report['sample']
    assert r.stdout.count('qwen-edu pipeline report') == 1  # printed by rank 0 only
    kept = list(run.glob('pretrain.incomplete.*'))  # set aside once (by rank 0), not by every process
    assert len(kept) == 1 and (kept[0] / 'metrics.jsonl').read_text() == '{}\n'


# --- the main job's payoff (issue #12): task text in pre-training, a large held-out suite disjoint from training ---

def test_default_suite_is_500_distinct_heldout_prompts_disjoint_from_every_training_prompt(tmp_path):
    "The default run's suite: >= 500 distinct held-out prompts, none in the task text or any post-training stage's data."
    from qwen_edu.pipeline import pipeline_suite, task_documents, pipeline_tasks, _post_examples, post_training_steps, pipeline_levels
    from qwen_edu.tasks import is_heldout
    cfg = PipelineConfig(out=str(tmp_path / 'run'))
    suite = pipeline_suite(cfg)
    prompts = [e.prompt for e in suite]
    assert len(set(prompts)) == len(prompts) >= 500 and all(is_heldout(p) for p in prompts)
    n_text = int(cfg.corpus_size * cfg.task_fraction / (1 - cfg.task_fraction))
    trained = {p for d in task_documents(pipeline_tasks(cfg), n_text, cfg.seed, levels=pipeline_levels(cfg)) for p in d['prompts']}
    for name, n in (('sft', 16 * post_training_steps(cfg, 'sft')), ('dpo', 4 * post_training_steps(cfg, 'dpo')), ('grpo', 400)):
        trained |= {e.prompt for e in _post_examples(cfg, name, n)}
    assert len(trained) > 1000 and not trained & set(prompts)
    # the word-problem text covers most training prompts of its family: the split, not luck, keeps the suite out
    assert sum(not is_heldout(p) for p in trained) == len(trained)
    # the default is tier 1; levels='1,2' puts both tiers in the suite and in every stage's training examples
    assert {e.level for e in suite} == {1}
    both = PipelineConfig(out=str(tmp_path / 'run'), levels='1,2')
    assert {e.level for e in pipeline_suite(both)} == {1, 2} and {e.level for e in _post_examples(both, 'sft', 64)} == {1, 2}
    drills = lambda lv: ''.join(d['text'] for d in task_documents(['word'], 20_000, levels=lv) if not d['prompts'])
    assert '*' in drills((1, 2)) and '*' not in drills((1,))  # tier 2 multiplies: its drills hold the products


FULL = [a for a in SMALL]
FULL[FULL.index('--stages') + 1] = 'tokenizer,data,pretrain,sft,dpo,grpo,eval,sample'
FULL += ['--eval-prompts', '20', '--post-training-steps', '{"sft": 2, "dpo": 2, "grpo": 2}']


def test_full_run_reports_every_model_on_the_suite_and_never_trains_on_it(tmp_path, capsys):
    "All stages: report.json's eval block, report.md with its plots, and no suite prompt in the pre-training tokens."
    import numpy as np
    from qwen_edu.data import open_tokens
    from qwen_edu.tokenizer import BPETokenizer
    from qwen_edu.pipeline import pipeline_suite
    run = tmp_path / 'run'
    assert pipeline_cli(['--out', str(run), *FULL]) == 0
    out = capsys.readouterr().out
    rep = strict_json(run / 'report.json')
    ev = rep['eval']
    suite = ev['suite']
    assert suite['distinct'] == suite['prompts'] == sum(suite['families'].values()) and suite['families']['word'] == 20
    for m in ('base', 'sft', 'dpo', 'grpo'):
        r = ev[m]
        assert set(r) >= {'accuracy', 'ci95', 'n'} and r['n'] == suite['prompts']
        assert r['ci95'][0] <= r['accuracy'] <= r['ci95'][1] and r['ci95'][1] - r['ci95'][0] > 0
        assert {lv: x['n'] for lv, x in r['levels'].items()} == suite['levels']  # per tier, the same items
    assert 'held-out accuracy' in out and 'grpo' in out and 'paired change' in out
    assert list(ev['changes']) == ['base->sft', 'sft->dpo', 'dpo->grpo']
    lo, hi = rep['dpo']['heldout_pref_accuracy_ci95']  # the stage keeps its interval
    assert lo <= rep['dpo']['heldout_pref_accuracy_after'] <= hi
    d = rep['dpo']  # DPO trains on the SFT model's own mistakes among 8 prompts per step (at least 16), all recorded
    assert d['pairs'] == 'own' and 0 < d['train_pairs'] <= d['train_prompts'] == 16
    from qwen_edu.pipeline import _post_examples
    assert set(json.loads((run / 'dpo' / 'train_prompts.json').read_text())) == {e.prompt for e in _post_examples(PipelineConfig(), 'dpo', 16)}
    scores = json.loads((run / 'eval' / 'scores.json').read_text())
    for m in ('base', 'sft', 'dpo', 'grpo'): assert sum(scores[m]) / len(scores[m]) == pytest.approx(ev[m]['accuracy'])
    assert ev['changes']['sft->dpo']['delta'] == pytest.approx(ev['dpo']['accuracy'] - ev['sft']['accuracy'])
    md = (run / 'report.md').read_text()
    assert "own mistakes on 16 training prompts" in md
    assert '| grpo |' in md and (run / 'accuracy.png').exists() and (run / 'post_training.png').exists()
    for s in ('data', 'sft', 'dpo', 'grpo'): assert json.loads((run / s / 'train_prompts.json').read_text())
    assert rep['data']['task_share'] > 0.2
    # the pre-training tokens themselves hold task text, but no prompt of the suite
    tok = BPETokenizer.from_hf(run / 'tokenizer')
    text = tok.decode(np.asarray(open_tokens(run / 'data', 'train')).tolist())
    cfg = PipelineConfig(out=str(run), eval_prompts=20)
    assert 'How many' in text and not [e.prompt for e in pipeline_suite(cfg) if e.prompt in text]
    # a planted leak (a suite prompt among SFT's training prompts) makes the eval stage refuse to score
    leak = json.loads((run / 'sft' / 'train_prompts.json').read_text()) + [pipeline_suite(cfg)[0].prompt]
    (run / 'sft' / 'train_prompts.json').write_text(json.dumps(leak))
    (run / 'eval' / 'done.json').unlink()
    with pytest.raises(RuntimeError, match='held-out prompt.*trained on'):
        run_pipeline(PipelineConfig(out=str(run), stages='eval', eval_prompts=20))


@pytest.mark.parametrize('kw,msg', [(dict(tasks='arith,nope'), 'tasks must name'), (dict(task_fraction=1.0), 'task_fraction'),
                                    (dict(eval_prompts=0), 'eval_prompts'), (dict(sft_lr=-1.0), 'sft_lr'),
                                    (dict(post_training_steps={'ppo': 3}), 'post_training_steps'),
                                    (dict(levels='3'), 'levels must be'), (dict(levels='1,1'), 'levels must be')])
def test_bad_task_arguments_are_refused(tmp_path, kw, msg):
    from qwen_edu.pipeline import validate_pipeline
    with pytest.raises(ValueError, match=msg): validate_pipeline(PipelineConfig(out=str(tmp_path / 'r'), **kw))
    assert not (tmp_path / 'r').exists()


def test_gpu_profile_sets_its_defaults_and_flags_override_them(tmp_path, capsys, monkeypatch):
    "`--profile gpu` picks edu-small and its sizes; an explicit flag wins; an unknown profile is a clear error."
    import qwen_edu.pipeline as P
    seen = {}
    monkeypatch.setattr(P, 'run_ranks', lambda job, prog: seen.setdefault('ctx', {}))
    monkeypatch.setattr(P, 'validate_pipeline', lambda cfg: seen.update(cfg=cfg))
    monkeypatch.setattr(P, 'format_report', lambda ctx, run: '')
    assert pipeline_cli(['--profile', 'gpu', '--max-steps', '7', '--out', str(tmp_path / 'g')]) == 0
    cfg = seen['cfg']
    assert cfg.preset == 'edu-small' and cfg.device == 'cuda' and cfg.max_steps == 7 and cfg.seq_len == 512
    assert cfg.post_training_steps['sft'] == P.PROFILES['gpu']['post_training_steps']['sft']
    assert P.PipelineConfig.from_profile('gpu', device='cpu').device == 'cpu'
    assert pipeline_cli(['--profile', 'tpu']) == 2 and 'unknown --profile' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown profile'): P.PipelineConfig.from_profile('tpu')
