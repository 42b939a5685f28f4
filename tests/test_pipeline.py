"""The end-to-end pipeline (qwen_edu.pipeline): stages run, resume by skipping finished ones, clear errors."""
import json
from pathlib import Path
import pytest
from qwen_edu.pipeline import (PipelineConfig, run_pipeline, pipeline_cli, register_stage, STAGES, format_report,
                               prepare_builtin_data)

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
    # every stage finished: a second call skips them all; removing one stage's done.json reruns only that stage
    (run / 'sample' / 'done.json').unlink()
    before = (run / 'pretrain' / 'metrics.jsonl').read_text()
    assert pipeline_cli(['--out', str(run), *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.count('skipping') == 3 and '[sample] running' in out
    assert (run / 'pretrain' / 'metrics.jsonl').read_text() == before


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['pretrian'\]"):
        run_pipeline(PipelineConfig(out=str(tmp_path / 'r'), stages='tokenizer,pretrian'))
    assert not (tmp_path / 'r').exists()


def test_register_stage_places_post_training_after_pretrain():
    saved = dict(STAGES)
    try:
        STAGES.clear(); STAGES.update({k: saved[k] for k in ('tokenizer', 'data', 'pretrain', 'sample')})
        register_stage('sft', lambda cfg, ctx: {}, after='pretrain')
        assert list(STAGES) == ['tokenizer', 'data', 'pretrain', 'sft', 'sample']
    finally:
        STAGES.clear(); STAGES.update(saved)


def test_prepare_builtin_data_builds_once(tmp_path):
    d = prepare_builtin_data(tmp_path / 'b', corpus_size=100_000, vocab_size=300)
    assert (d / 'train.bin').exists() and json.loads((d / 'meta.json').read_text())['vocab_size'] == 300
    mtime = (d / 'train.bin').stat().st_mtime_ns
    assert prepare_builtin_data(tmp_path / 'b', corpus_size=100_000, vocab_size=300) == d
    assert (d / 'train.bin').stat().st_mtime_ns == mtime


def test_post_training_stages_register_whatever_the_import_order():
    import subprocess, sys
    code = ("import qwen_edu.grpo\nimport qwen_edu.pipeline as P\nP.load_post_training_stages()\n"
            "print(','.join(P.STAGES))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == 'tokenizer,data,pretrain,sft,dpo,grpo,sample'


def test_rerunning_a_stage_makes_the_later_ones_stale(tmp_path, monkeypatch):
    import qwen_edu.pipeline as P
    calls = []
    def stage(name):
        def fn(cfg, ctx): calls.append(name); return {'n': len(calls)}
        return fn
    monkeypatch.setattr(P, 'load_post_training_stages', lambda: None)
    monkeypatch.setattr(P, 'STAGES', {k: stage(k) for k in ('a', 'b', 'c')})
    cfg = PipelineConfig(out=str(tmp_path / 'run'), stages='a,b')
    run_pipeline(cfg); assert calls == ['a', 'b']
    run_pipeline(cfg); assert calls == ['a', 'b']                 # all done: nothing runs
    (tmp_path / 'run' / 'a' / 'done.json').unlink()
    ctx = run_pipeline(PipelineConfig(out=str(tmp_path / 'run'), stages='a'))
    assert calls == ['a', 'b', 'a'] and 'b' not in ctx            # b was built from the old a: no longer reported
    assert (tmp_path / 'run' / 'b' / 'stale.json').exists()
    run_pipeline(cfg); assert calls == ['a', 'b', 'a', 'b']       # and it runs again when asked
