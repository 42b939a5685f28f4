"HF interop: logits parity with transformers (tied, untied, YaRN, sharded), round trip through to_hf, clear errors."
import json, warnings
import pytest, torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, AutoModelForCausalLM
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.hf import from_hf, to_hf, config_from_hf, config_to_hf, resolve_checkpoint, check_tensors

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings('ignore')
YARN = {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 64}


def tiny_hf(tie=True, rope_scaling=None, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e4, tie_word_embeddings=tie,
                rope_scaling=rope_scaling)
    m = Qwen2ForCausalLM(Qwen2Config(**{**args, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():  # wider than HF's std 0.02, so that a mismatch cannot hide in tiny logits
            if n.endswith('bias') or 'norm' in n: p.add_(torch.randn_like(p) * 0.1)
            else: p.normal_(0, 0.08)
    return m


def logits(m, x, mask=None):
    with torch.no_grad(): return m(x, attention_mask=mask).logits


X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
MASK = torch.ones(2, 24, dtype=torch.long); MASK[1, :5] = 0  # left padding on row 1

CASES = {'tied': dict(tie=True), 'untied': dict(tie=False, seed=1), 'yarn': dict(tie=False, rope_scaling=YARN, seed=2),
         'head_dim': dict(tie=True, head_dim=32, seed=3)}


@pytest.mark.parametrize('case', list(CASES))
def test_from_memory_matches_transformers(case):
    hf = tiny_hf(**CASES[case])
    ours = from_hf(hf)
    assert isinstance(ours, QwenForCausalLM)
    torch.testing.assert_close(logits(ours, X), logits(hf, X), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours, X, MASK)[1, 5:], logits(hf, X, MASK)[1, 5:], atol=1e-5, rtol=0)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == CASES[case]['tie']


@pytest.mark.parametrize('case,shard', [('tied', '5GB'), ('untied', '30kB'), ('yarn', '30kB')])
def test_from_folder_matches_transformers(tmp_path, case, shard):
    hf = tiny_hf(**CASES[case])
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    if shard != '5GB': assert (tmp_path / 'model.safetensors.index.json').exists()
    ours = from_hf(tmp_path)
    torch.testing.assert_close(logits(ours, X), logits(hf, X), atol=1e-5, rtol=0)
    if case != 'yarn': assert ours.config.rope_scaling is None
    else: assert ours.config.rope_scaling['rope_type'] == 'yarn' and ours.config.rope_scaling['factor'] == 4.0


@pytest.mark.parametrize('case,shard', [('tied', '5GB'), ('untied', '30kB'), ('yarn', '30kB')])
def test_to_hf_round_trip(tmp_path, case, shard):
    ours = from_hf(tiny_hf(**CASES[case]))
    to_hf(ours, tmp_path, max_shard_size=shard)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['architectures'] == ['Qwen2ForCausalLM'] and cfg['model_type'] == 'qwen2'
    assert cfg['torch_dtype'] == 'float32'
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == 'Qwen2ForCausalLM'
    torch.testing.assert_close(logits(back, X), logits(ours, X), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(from_hf(tmp_path), X), logits(ours, X), atol=0, rtol=0)


def test_bf16_and_dtype_option(tmp_path):
    hf = tiny_hf()
    ours = from_hf(hf, dtype='bfloat16')
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    back = from_hf(tmp_path, dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()): assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"): from_hf(hf, dtype='int8')


def test_config_conversion_both_ways():
    for name in ['qwen2.5-0.5b', 'qwen2.5-7b']:
        c = QwenConfig.from_preset(name, rope_scaling={'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32768})
        assert config_from_hf(config_to_hf(c)) == c
        hc = Qwen2Config(**config_to_hf(c))  # transformers reads our dict
        assert hc.rope_parameters['rope_type'] == 'yarn' and hc.rope_parameters['factor'] == 4.0
        assert hc.rope_parameters['rope_theta'] == c.rope_theta and hc.tie_word_embeddings == c.tie_word_embeddings
        assert config_from_hf(hc.to_dict()) == c  # and we read transformers 5's rope_parameters
    moe = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=64, mlp_only_layers=[1])
    d = config_to_hf(moe)
    assert d['model_type'] == 'qwen2_moe' and d['architectures'] == ['Qwen2MoeForCausalLM']
    assert config_from_hf(d) == moe
    hm = transformers.Qwen2MoeConfig(**d)
    assert (hm.num_experts, hm.num_experts_per_tok, hm.mlp_only_layers) == (4, 2, [1])
    dense = config_to_hf(QwenConfig.from_preset('edu-tiny'))
    assert 'num_experts' not in dense and dense['architectures'] == ['Qwen2ForCausalLM']


def _saved(tmp_path):
    to_hf(from_hf(tiny_hf()), tmp_path)
    return json.loads((tmp_path / 'config.json').read_text())


def test_wrong_architecture(tmp_path):
    cfg = _saved(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}))
    with pytest.raises(ValueError, match=r"'llama' checkpoint \(LlamaForCausalLM\); qwen_edu loads only Qwen2"): from_hf(tmp_path)
    with pytest.raises(ValueError, match='use_sliding_window'): config_from_hf({**cfg, 'use_sliding_window': True})


def test_missing_extra_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = _saved(tmp_path)
    f = tmp_path / 'model.safetensors'
    sd = load_file(f)
    save_file({k: v for k, v in sd.items() if k != 'model.norm.weight'}, f)
    with pytest.raises(ValueError, match='missing tensors: model.norm.weight'): from_hf(tmp_path)
    save_file({**sd, 'model.layers.0.mlp.extra.weight': torch.zeros(2)}, f)
    with pytest.raises(ValueError, match=r'unexpected tensors: model.layers.0.mlp.extra.weight'): from_hf(tmp_path)
    save_file({**sd, 'model.layers.1.self_attn.k_proj.weight': torch.zeros(64, 64)}, f)
    with pytest.raises(ValueError, match=r'model.layers.1.self_attn.k_proj.weight: expected \(32, 64\), found \(64, 64\)'):
        from_hf(tmp_path)
    save_file(sd, f)
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'intermediate_size': 96}))
    with pytest.raises(ValueError, match=r'mlp.gate_proj.weight: expected \(96, 64\), found \(128, 64\)'): from_hf(tmp_path)
    # an untied config over tied weights: the head is missing
    (tmp_path / 'config.json').write_text(json.dumps({**cfg, 'tie_word_embeddings': False}))
    with pytest.raises(ValueError, match='missing tensors: lm_head.weight'): from_hf(tmp_path)


def test_no_safetensors_and_missing_files(tmp_path):
    _saved(tmp_path)
    (tmp_path / 'model.safetensors').rename(tmp_path / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='never unpickles'): from_hf(tmp_path)
    (tmp_path / 'pytorch_model.bin').unlink()
    with pytest.raises(FileNotFoundError, match='no \\*.safetensors'): from_hf(tmp_path)
    (tmp_path / 'config.json').unlink()
    with pytest.raises(FileNotFoundError, match='no config.json'): from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match='no checkpoint folder'): from_hf(tmp_path / 'does-not-exist')


def test_missing_shard(tmp_path):
    tiny_hf(tie=False).save_pretrained(tmp_path, max_shard_size='30kB')
    next(tmp_path.glob('model-00002-*.safetensors')).unlink()
    with pytest.raises(FileNotFoundError, match='lists the shard model-00002'): from_hf(tmp_path)


def test_hub_id_uses_snapshot_download(monkeypatch, tmp_path):
    import huggingface_hub
    calls = {}
    def fake(repo_id, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns); return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake)
    assert resolve_checkpoint('Qwen/Qwen2.5-0.5B-Instruct') == tmp_path
    assert calls['repo_id'] == 'Qwen/Qwen2.5-0.5B-Instruct'
    assert not any('bin' in p or p == '*' for p in calls['allow_patterns'])
    def offline(*a, **k): raise OSError('offline')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
    with pytest.raises(FileNotFoundError, match='could not be fetched'): resolve_checkpoint('Qwen/Nope')


def test_check_tensors_reports_everything():
    with pytest.raises(ValueError) as e: check_tensors({'a': (2, 3), 'c': (1,)}, {'a': (2, 4), 'b': (3,)})
    assert 'missing tensors: b' in str(e.value) and 'unexpected tensors: c' in str(e.value)
    assert 'a: expected (2, 4), found (2, 3)' in str(e.value)
    check_tensors({'a': (2, 3)}, {'a': torch.Size([2, 3])})


def test_index_cannot_name_files_outside_the_folder(tmp_path):
    hf = tiny_hf(tie=False)
    ck = tmp_path / 'ck'; hf.save_pretrained(ck, max_shard_size='30kB')
    idx = ck / 'model.safetensors.index.json'
    d = json.loads(idx.read_text())
    first = sorted(set(d['weight_map'].values()))[0]
    (ck / first).rename(tmp_path / 'outside.safetensors')
    def point(name):
        idx.write_text(json.dumps({**d, 'weight_map': {k: name if v == first else v for k, v in d['weight_map'].items()}}))
    for name in ['../outside.safetensors', str(tmp_path / 'outside.safetensors'), 'sub/../../outside.safetensors', '..\\outside.safetensors']:
        point(name)
        with pytest.raises(ValueError, match='outside the checkpoint folder'): from_hf(ck)
    point(3)
    with pytest.raises(ValueError, match='file names'): from_hf(ck)
    idx.write_text(json.dumps({'metadata': {}}))
    with pytest.raises(ValueError, match="no 'weight_map'"): from_hf(ck)
    idx.write_text(json.dumps(d))
    (ck / first).symlink_to(tmp_path / 'outside.safetensors')  # a link inside the folder to a file outside it
    with pytest.raises(ValueError, match='outside the checkpoint folder'): from_hf(ck)
    (ck / first).unlink(); (ck / first).symlink_to('../outside.safetensors')
    with pytest.raises(ValueError, match='outside the checkpoint folder'): from_hf(ck)
    idx.unlink()  # without an index: the *.safetensors files of the folder are checked the same way
    with pytest.raises(ValueError, match='outside the checkpoint folder'): from_hf(ck)


def test_hub_cache_layout_still_loads(tmp_path):
    "In a Hugging Face hub cache a snapshot's files are links into the repo's blobs/ folder: that is not an escape."
    hf = tiny_hf(tie=False)
    src = tmp_path / 'src'; hf.save_pretrained(src, max_shard_size='30kB')
    repo = tmp_path / 'models--Qwen--tiny'; (repo / 'blobs').mkdir(parents=True)
    snap = repo / 'snapshots' / 'abc123'; snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        f.rename(repo / 'blobs' / f'blob{i}')
        (snap / f.name).symlink_to(f'../../blobs/blob{i}')
    torch.testing.assert_close(logits(from_hf(snap), X), logits(hf, X), atol=1e-5, rtol=0)


def test_to_hf_never_leaves_stale_weights(tmp_path, monkeypatch):
    big, small = from_hf(tiny_hf(tie=False, seed=1)), from_hf(tiny_hf())
    to_hf(big, tmp_path, max_shard_size='30kB', generation_config={'eos_token_id': 5})  # shards + index
    (tmp_path / 'pytorch_model.bin').write_bytes(b'an old pickle')
    (tmp_path / 'pytorch_model.bin.index.json').write_text('{}')
    mine = {'tokenizer.json': '{}', 'README.md': 'my notes', 'data.txt': 'keep'}
    for k, v in mine.items(): (tmp_path / k).write_text(v)
    (tmp_path / 'sub').mkdir(); (tmp_path / 'sub' / 'x.safetensors').write_text('not ours to touch')
    listing = lambda: sorted(p.name for p in tmp_path.iterdir())
    before = listing()
    with pytest.raises(FileExistsError, match=r'already holds model files.*pytorch_model\.bin.*overwrite=True'):
        to_hf(small, tmp_path)
    assert listing() == before  # refused: nothing touched
    import qwen_edu.hf as H
    real = H.save_file
    def disk_full(*a, **k): raise OSError('No space left on device')
    monkeypatch.setattr(H, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left'): to_hf(small, tmp_path, overwrite=True)
    assert listing() == before  # a failed write keeps the old checkpoint (and leaves no temporary folder)
    monkeypatch.setattr(H, 'save_file', real)
    to_hf(small, tmp_path, overwrite=True)
    assert listing() == sorted(['config.json', 'model.safetensors', 'sub', *mine])  # no stale shard, index, pickle, generation config
    assert all((tmp_path / k).read_text() == v for k, v in mine.items())
    assert (tmp_path / 'sub' / 'x.safetensors').exists()
    torch.testing.assert_close(logits(from_hf(tmp_path), X), logits(small, X), atol=0, rtol=0)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), X), logits(small, X), atol=1e-5, rtol=0)
    (tmp_path / 'new').mkdir(); to_hf(small, tmp_path / 'new')  # an existing empty folder is fine
    with pytest.raises(FileExistsError, match='is a file'): to_hf(small, tmp_path / 'README.md')


def test_index_and_config_must_be_json_objects(tmp_path):
    hf = tiny_hf(tie=False)
    hf.save_pretrained(tmp_path, max_shard_size='30kB')
    idx = tmp_path / 'model.safetensors.index.json'
    for text in ('[]', '"x"', '{"weight_map": []}', '{"weight_map": null}', 'not json'):
        idx.write_text(text)
        with pytest.raises(ValueError, match='model.safetensors.index.json'): from_hf(tmp_path)
    (tmp_path / 'config.json').write_text('[]')
    with pytest.raises(ValueError, match=r'config.json must hold a JSON object'): from_hf(tmp_path)
    (tmp_path / 'config.json').write_text('{oops')
    with pytest.raises(ValueError, match=r'config.json is not valid JSON'): from_hf(tmp_path)
