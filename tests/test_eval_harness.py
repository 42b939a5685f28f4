"""The lm-evaluation-harness adapter (nbs/17b_eval_harness.ipynb): each LM method against a forward pass by hand, and
lm_eval itself running the adapter offline on a task defined from local files."""
import importlib, json, socket, sys
import pytest
import torch

pytest.importorskip('lm_eval')  # the optional extra: pip install -e ".[eval]" (CI installs it)
from qwen_edu.config import QwenConfig
from qwen_edu.generate import generate
from qwen_edu.model import QwenForCausalLM
from qwen_edu.tokenizer import BPETokenizer, stdlib_corpus
from qwen_edu.eval.harness import QwenEduLM, encode_pair, generation_settings, register, score_pairs

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # toy models: intra-op threads only spin on a shared runner


@pytest.fixture(scope='module')
def tok():
    return BPETokenizer.train(stdlib_corpus(200_000), 512, special_tokens=['<|endoftext|>'])


@pytest.fixture(scope='module')
def model(tok):
    cfg = QwenConfig.from_preset('edu-tiny', vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return QwenForCausalLM(cfg).eval()


@pytest.fixture
def offline(monkeypatch):
    "No network: the hub's offline switches on, and any socket connection fails the test."
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1'); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    for mod, attr in (('datasets.config', 'HF_DATASETS_OFFLINE'), ('datasets.config', 'HF_HUB_OFFLINE'),
                      ('huggingface_hub.constants', 'HF_HUB_OFFLINE')):
        m = sys.modules.get(mod) or importlib.import_module(mod)
        if hasattr(m, attr): monkeypatch.setattr(m, attr, True)
    def refuse(self, address, *a, **k): raise AssertionError(f"network access attempted: {address}")
    monkeypatch.setattr(socket.socket, 'connect', refuse)


def by_hand(model, ctx, cont):
    "(log p(cont | ctx), greedy?) from one unbatched forward over the whole sequence."
    with torch.no_grad(): logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[p, t].item() for p, t in zip(pos, cont)), all(logp[p].argmax().item() == t for p, t in zip(pos, cont))


def request_ids(lm, ctx, cont):
    return encode_pair(lm.tokenizer, ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))


REQS = [('The quick brown fox', ' jumps over'), ('def f(x):', '\n    return x'), ('a', ' b'), ('', 'hello world'),
        ('import os ', 'sys'), ('The quick brown fox', ' sleeps'), ('The quick brown fox', ' x'),
        ('for i in range(10):\n    print(i)\n', 'print("done")'), ('def f(x):', ' pass')]


def test_loglikelihood_equals_forward_by_hand(model, tok):
    "9 requests of different lengths, some sharing a context, in batches of 2: each equals one forward, in order."
    from lm_eval.api.instance import Instance
    lm = QwenEduLM(model, tok, batch_size=2)
    got = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(REQS)])
    ref = [by_hand(model, *request_ids(lm, c, x)) for c, x in REQS]
    assert [l for l, _ in got] == pytest.approx([l for l, _ in ref], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in ref]
    assert got == lm.loglikelihood(REQS)  # plain tuples too


def test_encode_pair_follows_the_hf_backend(tok):
    "Trailing whitespace moves to the continuation; the whole is encoded together and cut after the context's tokens."
    ctx, cont = encode_pair(tok, 'The answer is ', 'yes')
    assert tok.decode(ctx) == 'The answer is' and tok.decode(cont) == ' yes'
    assert ctx + cont == tok.encode('The answer is yes')


def test_is_greedy(model, tok):
    "True for the model's own greedy tokens (when their text tokenises back to them), False for another continuation."
    lm = QwenEduLM(model, tok, batch_size=4)
    for prompt in ('import os', 'def f(x):', 'The quick brown fox', 'a'):
        own = generate(model, [tok.encode(prompt)], max_new_tokens=3, stop_tokens=None)[0]
        if encode_pair(tok, prompt, tok.decode(own))[1] == own: break
    else: pytest.fail('no greedy continuation tokenises back to itself')
    other = next(t for t in range(256) if t != own[0])  # a different first token
    res = lm.loglikelihood([(prompt, tok.decode(own)), (prompt, tok.decode([other] + own[1:]))])
    assert [g for _, g in res] == [True, False]


def test_left_truncation(model, tok):
    "Past max_length, the input keeps its last tokens: (context + continuation)[-(max_length + 1):][:-1]."
    lm = QwenEduLM(model, tok, batch_size=4, max_length=12)
    ctx_text = 'def f(x):\n    return x + 1\n\nprint(f(2))\n' * 2
    ctx, cont = encode_pair(tok, ctx_text, 'import sys')
    assert len(ctx) + len(cont) > 13
    whole = (ctx + cont)[-13:]
    ref = by_hand(model, whole[:len(whole) - len(cont)], cont)[0]
    assert lm.loglikelihood([(ctx_text, 'import sys')])[0][0] == pytest.approx(ref, abs=1e-4)


def test_score_pairs_shares_contexts(model):
    "Many continuations per context (shared KV cache) equal one forward each, with batch sizes that split the groups."
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()
    pairs = [(ctx, rand(m)) for ctx in [rand(n) for n in (30, 5, 17, 1)] for m in (1, 4, 2, 6, 3)]
    ref = [by_hand(model, c, x) for c, x in pairs]
    for bs in (1, 3, 64):
        got = score_pairs(model, pairs, batch_size=bs)
        assert [l for l, _ in got] == pytest.approx([l for l, _ in ref], abs=1e-4)
        assert [h for _, h in got] == [h for _, h in ref]


def test_rolling_short_text_is_one_forward(model, tok):
    text = 'def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n'
    lm = QwenEduLM(model, tok, batch_size=4)
    ids = tok.encode(text)
    assert len(ids) < lm.max_length
    got = lm.loglikelihood_rolling([text, 'x'])
    assert got[0] == pytest.approx(by_hand(model, [tok.eos_id], ids)[0], abs=1e-4)
    assert got[1] == pytest.approx(by_hand(model, [tok.eos_id], tok.encode('x'))[0], abs=1e-4)


def test_rolling_windows(model, tok):
    "With max_length 16, tokens [s, e) are predicted from the 16 tokens before e (the first from <|endoftext|>)."
    text = ('class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n'
            '        self.items.append(x)\n')
    ids, L = tok.encode(text), 16
    assert len(ids) > 3 * L
    full = [tok.eos_id] + ids
    ref = sum(by_hand(model, full[max(0, e - L):s + 1], ids[s:e])[0]
              for s, e in ((s, min(s + L, len(ids))) for s in range(0, len(ids), L)))
    got = QwenEduLM(model, tok, batch_size=2, max_length=L).loglikelihood_rolling([text, 'short text'])
    assert got[0] == pytest.approx(ref, abs=1e-3)
    assert got[1] == pytest.approx(by_hand(model, [tok.eos_id], tok.encode('short text'))[0], abs=1e-4)


def test_generate_until_stops(model, tok):
    "Stop strings cut the text (and end generation early), max_gen_toks bounds it, batching changes nothing."
    lm = QwenEduLM(model, tok, batch_size=2)
    prompt = tok.encode('def f(x):')
    new = generate(model, [prompt], max_new_tokens=12, stop_tokens=[tok.eos_id])[0]
    full = tok.decode(new)
    assert lm.generate_until([('def f(x):', {'max_gen_toks': 5})]) == [tok.decode(new[:5])]
    stop = tok.decode(new[2:4])
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try: out = lm.generate_until([('def f(x):', {'until': [stop], 'max_gen_toks': 40})])
    finally: hook.remove()
    assert out == [full.split(stop)[0]]
    assert len(calls) <= 5  # stopped once the stop string appeared, not after 40 tokens
    reqs = [('def f(x):', {'max_gen_toks': 6}), ('import', {'max_gen_toks': 6}), ('The quick brown fox', {'max_gen_toks': 6}),
            ('a', {'max_gen_toks': 3, 'until': ['\n']})]
    assert lm.generate_until(reqs) == [lm.generate_until([r])[0] for r in reqs]


def test_generation_settings():
    s = generation_settings({'until': 'Q:', 'do_sample': False, 'temperature': 0.8, 'max_gen_toks': 7})
    assert (s['until'], s['temperature'], s['max_new_tokens']) == (['Q:'], 0.0, 7)
    assert generation_settings({'temperature': 0.5})['temperature'] == 0.5  # no do_sample: temperature > 0 samples
    assert generation_settings({'do_sample': True})['temperature'] == 1.0
    with pytest.raises(ValueError, match=r"unsupported generation kwargs \['num_beams'\]"): generation_settings({'num_beams': 2})


def test_sampling_is_seeded(model, tok):
    lm = QwenEduLM(model, tok, batch_size=2)
    req = [('import os', {'do_sample': True, 'temperature': 1.0, 'max_gen_toks': 8})]
    torch.manual_seed(3); a = lm.generate_until(req)
    torch.manual_seed(3); b = lm.generate_until(req)
    assert a == b


def _write_task(d, docs):
    (d / 'sums.jsonl').write_text('\n'.join(json.dumps(x) for x in docs))
    (d / 'toy_sums.yaml').write_text(f"""task: toy_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'sums.jsonl'}
  cache_dir: {d / 'hf_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")


DOCS = [{'question': f'What is {a} plus {b}?', 'choices': [str(a + b), str(a + b + 1), str(a * b), str(a - b)], 'answer': k % 4}
        for k, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 3)])]


def _acc_by_hand(lm):
    lls = lm.loglikelihood([(f"Question: {d['question']}\nAnswer:", ' ' + c) for d in DOCS for c in d['choices']])
    return sum(max(range(4), key=lambda j: lls[4 * i + j][0]) == d['answer'] for i, d in enumerate(DOCS)) / len(DOCS)


def test_lm_eval_runs_a_local_task_offline(model, tok, tmp_path, offline):
    "simple_evaluate on a YAML + jsonl task: its acc is the argmax over the adapter's log-likelihoods."
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    _write_task(tmp_path, DOCS)
    lm = QwenEduLM(model, tok, batch_size=4)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=['toy_sums'], task_manager=tm, bootstrap_iters=0, log_samples=False)
    assert res['results']['toy_sums']['acc,none'] == _acc_by_hand(lm)
    assert res['results']['toy_sums']['sample_len'] == 8


def test_register_and_build_from_a_checkpoint(model, tok, tmp_path, offline):
    "register() twice is harmless; lm_eval builds the adapter by name from --model_args path=DIR."
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from qwen_edu.hf import to_hf
    assert register() is QwenEduLM and register() is QwenEduLM
    assert get_model('qwen-edu') is QwenEduLM
    assert get_model('hf').__name__ == 'HFLM'  # the built-in models are still there
    ckpt = tmp_path / 'ckpt'
    to_hf(model, ckpt); tok.save_hf(ckpt)
    lm = get_model('qwen-edu').create_from_arg_string(f'path={ckpt}', {'batch_size': 4, 'max_batch_size': None, 'device': 'cpu'})
    assert lm.batch_size == 4 and lm.max_length == model.config.max_position_embeddings
    ours = [l for l, _ in QwenEduLM(model, tok).loglikelihood(REQS)]
    assert [l for l, _ in lm.loglikelihood(REQS)] == pytest.approx(ours, abs=1e-5)
    _write_task(tmp_path, DOCS)
    for model_args in (f'path={ckpt}', {'path': str(ckpt)}):  # the command line passes a dict
        res = simple_evaluate(model='qwen-edu', model_args=model_args, batch_size=3, device='cuda:0', tasks=['toy_sums'],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                              bootstrap_iters=0, log_samples=False)
        assert res['results']['toy_sums']['acc,none'] == _acc_by_hand(lm)
    with pytest.raises(ValueError, match='path=CHECKPOINT'): QwenEduLM.create_from_arg_string('dtype=float32')


def test_command_line(model, tok, tmp_path):
    "`python -m qwen_edu.eval.harness` is lm_eval's command line with qwen-edu registered (offline, local task)."
    import os, subprocess
    from qwen_edu.hf import to_hf
    to_hf(model, tmp_path / 'ckpt'); tok.save_hf(tmp_path / 'ckpt')
    _write_task(tmp_path, DOCS)
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'qwen_edu.eval.harness', '--model', 'qwen-edu', '--model_args', f"path={tmp_path / 'ckpt'}",
                        '--tasks', 'toy_sums', '--include_path', str(tmp_path), '--batch_size', '4'],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next((l for l in r.stdout.splitlines() if l.startswith('|toy_sums')), None)
    assert row is not None, r.stdout
    cells = [c.strip() for c in row.split('|')]
    assert float(cells[cells.index('acc') + 2]) == pytest.approx(_acc_by_hand(QwenEduLM(model, tok)), abs=1e-3), row


def test_bad_input(model, tok):
    lm = QwenEduLM(model, tok, batch_size=2)
    with pytest.raises(ValueError, match='empty continuation'): lm.loglikelihood([('Question: 2+2=', '')])
    with pytest.raises(TypeError, match=r'must be \(str, str\), got \(str, int\)'): lm.loglikelihood([('Question: 2+2=', 4)])
    with pytest.raises(TypeError, match=r'must be \(str\), got \(NoneType\)'): lm.loglikelihood_rolling([None])
    with pytest.raises(TypeError, match=r'must be \(str, dict\)'): lm.generate_until([('Q:', ['\n'])])
    with pytest.raises(ValueError, match='batch_size must be a positive int'): QwenEduLM(model, tok, batch_size='auto')
    with pytest.raises(ValueError, match='max_length must be in'): QwenEduLM(model, tok, max_length=10_000)
    with pytest.raises(TypeError, match='BPETokenizer'): QwenEduLM(model, 'gpt2')
    with pytest.raises(ValueError, match='no room for a prompt'):
        QwenEduLM(model, tok, max_length=8).generate_until([('Q:', {'max_gen_toks': 8})])


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == 'lm_eval' or m.startswith('lm_eval.')]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, 'qwen_edu.eval.harness')
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'): importlib.import_module('qwen_edu.eval.harness')


def test_core_package_does_not_import_the_adapter():
    import subprocess
    code = "import qwen_edu, qwen_edu.eval, qwen_edu.cli, sys; print('qwen_edu.eval.harness' in sys.modules, 'lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ['False', 'False']


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_matches_cpu(model, tok):
    import copy
    cpu = QwenEduLM(model, tok, batch_size=4)
    gpu = QwenEduLM(copy.deepcopy(model), tok, batch_size=4, device='cuda')
    assert gpu.device.type == 'cuda'
    assert [l for l, _ in gpu.loglikelihood(REQS)] == pytest.approx([l for l, _ in cpu.loglikelihood(REQS)], abs=1e-3)
    assert gpu.loglikelihood_rolling(['def f(x):\n    return x\n']) == pytest.approx(cpu.loglikelihood_rolling(['def f(x):\n    return x\n']), abs=1e-3)
    assert len(gpu.generate_until([('def f(x):', {'max_gen_toks': 4})])[0]) > 0


def test_batches_near_the_context_limit_equal_one_request_at_a_time():
    "A long context and a long continuation of other requests in one batch: still within the context, same numbers."
    from qwen_edu.config import QwenConfig
    from qwen_edu.model import QwenForCausalLM
    from qwen_edu.sft import train_task_tokenizer
    from qwen_edu.eval.harness import QwenEduLM
    tok = train_task_tokenizer(vocab_size=320, n=100)
    torch.manual_seed(0)
    m = QwenForCausalLM(QwenConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)).eval()
    many, one = QwenEduLM(m, tok, batch_size=8), QwenEduLM(m, tok, batch_size=1)  # default max_length: 64
    ctx, cont = "What is 12+30? " * 5, " Answer: 42 and then" * 4
    reqs = [(ctx, ' x'), ('a', cont), (ctx, cont[:20])]  # contexts of 69 (left-truncated) and 1 tokens, tails to 44
    for (a, ga), (b, gb) in zip(many.loglikelihood(reqs), one.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = "What is 3+4? Answer: 7. " * 30  # several windows of 64 at the default max_length
    assert many.loglikelihood_rolling([text])[0] == pytest.approx(one.loglikelihood_rolling([text])[0], abs=1e-3)
