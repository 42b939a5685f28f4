"""The evaluation chapter (qwen_edu.eval): intervals, the held-out suite (distinct, disjoint from training), bits per
byte, few-shot, reward-model accuracy, the contamination check at evaluation time, a run's report card, the CLI."""
import json, math
import numpy as np
import pytest, torch
import qwen_edu.eval as E

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def test_wilson_interval_matches_the_formula_and_covers():
    lo, hi = E.wilson_interval(7, 20)  # reference values (scipy/statsmodels 'wilson'): 0.1812, 0.5671
    assert lo == pytest.approx(0.18118, abs=1e-4) and hi == pytest.approx(0.56712, abs=1e-4)
    assert E.wilson_interval(0, 20)[0] == 0 and E.wilson_interval(0, 20)[1] > 0.1
    rng = np.random.default_rng(0)
    k = rng.binomial(50, 0.1, 3000)
    cover = np.mean([a <= 0.1 <= b for a, b in (E.wilson_interval(int(x), 50) for x in k)])
    assert 0.93 < cover < 0.98
    for bad in [(3, 2), (-1, 5), (1, 0), (1.0, 5)]:
        with pytest.raises(ValueError, match='0 <= k <= n'): E.wilson_interval(*bad)
    r = E.accuracy_record([1, 0, 1, 1])
    assert r['accuracy'] == 0.75 and r['n'] == 4 and r['ci95'][0] < 0.75 < r['ci95'][1]
    with pytest.raises(ValueError, match='0 or 1'): E.accuracy_record([0.5])
    with pytest.raises(ValueError, match='at least one'): E.accuracy_record([])


def test_suite_is_distinct_heldout_and_disjoint_from_training():
    from qwen_edu.tasks import make_examples, is_heldout
    suite = E.heldout_suite(n_per_family=120)
    prompts = [e.prompt for e in suite]
    assert len(set(prompts)) == len(prompts) and all(is_heldout(p) for p in prompts)
    train = {e.prompt for e in make_examples(list(E.SUITE_FAMILIES), 6000, split='train')}
    assert not train & set(prompts)
    counts = {f: sum(e.task == f for e in suite) for f in E.SUITE_FAMILIES}
    assert all(counts[f] == 120 for f in ('arith', 'word', 'instruct', 'table')) and 5 <= counts['code'] < 120
    assert sum(counts.values()) == 4 * 120 + counts["code"]
    assert E.heldout_suite(n_per_family=120) == suite  # reproducible
    with pytest.raises(ValueError, match='unknown task family'): E.heldout_suite(['chess'])


@pytest.fixture(scope='module')
def tiny():
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer(vocab_size=320, n=100)
    torch.manual_seed(0)
    return tok, toy_model(tok, hidden_size=32).eval()


def test_text_nll_and_bits_per_byte_equal_a_direct_forward(tiny):
    tok, model = tiny
    texts = ["def add(a, b):\n    return a + b\n", "What is 3 + 4? Answer: 7", "x"]
    with torch.no_grad():
        direct = []
        for t in texts:
            ids = torch.tensor([[tok.eos_id] + tok.encode(t)])
            direct.append(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction='sum').item())
    got = E.text_nll(model, tok, texts, batch_size=2)  # one window each (max_position_embeddings), padded batches
    assert got == pytest.approx(direct, rel=1e-5)
    r = E.bits_per_byte(model, tok, texts)
    assert r['bpb'] == pytest.approx(sum(direct) / math.log(2) / sum(len(t.encode()) for t in texts), rel=1e-5)
    assert r['ci95'][0] <= r['bpb'] <= r['ci95'][1]
    w = E.text_nll(model, tok, texts, seq_len=4)  # windows of 4 predictions: every token predicted exactly once
    with torch.no_grad():
        for t, got_w in zip(texts, w):
            ids = [tok.eos_id] + tok.encode(t)
            ref = 0.0
            for s in range(0, len(ids) - 1, 4):  # each window: ids[s] .. ids[s+4], its own forward from a fresh start
                x = torch.tensor([ids[s:s + 5]])
                ref += torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction='sum').item()
            assert got_w == pytest.approx(ref, rel=1e-5)
    long = "What is 3 + 4? Answer: 7. " * 200  # longer than the model's context: windows of max_position_embeddings - 1
    assert E.text_nll(model, tok, [long])[0] > 0
    with pytest.raises(ValueError, match='seq_len must be an int in'): E.text_nll(model, tok, texts, seq_len=10**6)
    with pytest.raises(ValueError, match='empty text'): E.bits_per_byte(model, tok, ['', 'x'])
    with pytest.raises(ValueError, match="non-empty 'text'"): E.domain_bits_per_byte(model, tok, [{'domain': 'code'}])
    docs = [{'text': t, 'domain': d} for t, d in zip(texts, ['code', 'math', 'math'])]
    by = E.domain_bits_per_byte(model, tok, docs)
    assert set(by) == {'code', 'math', 'all'} and by['all']['bpb'] == pytest.approx(r['bpb'])
    with pytest.raises(TypeError, match='must be str'): E.text_nll(model, tok, [3])
    with pytest.raises(ValueError, match='no texts'): E.bits_per_byte(model, tok, [])


def test_few_shot_prompt_and_accuracy_run(tiny):
    tok, model = tiny
    from qwen_edu.tasks import make_examples
    shots = make_examples('arith', 2, split='train')
    ex = E.heldout_suite(['arith'], 1)[0]
    p = E.few_shot_prompt(shots, ex)
    assert p.count('Question:') == 3 and p.endswith(f"Question: {ex.prompt}\nAnswer:") and shots[0].answer in p
    r = E.few_shot_accuracy(model, tok, 'arith', n=6, shots=2)
    assert r['n'] == 6 and 0 <= r['accuracy'] <= 1
    with pytest.raises(ValueError, match='few-shot families'): E.few_shot_accuracy(model, tok, 'code')


def test_reward_accuracy_by_family_counts_ties_as_wrong(tiny):
    tok, model = tiny
    from qwen_edu.reward import RewardModel, make_preference_pairs
    from qwen_edu.tasks import make_examples
    pairs = make_preference_pairs(None, tok, make_examples(['arith', 'word'], 12, seed=1, split='test'))
    rm = RewardModel(model.config)
    torch.nn.init.zeros_(rm.score.weight)  # a constant reward: every pair a tie
    r = E.evaluate_reward_by_family(rm, tok, pairs)
    assert r['all']['accuracy'] == 0 and set(r['families']) == {'arith', 'word'}
    assert sum(x['n'] for x in r['families'].values()) == r['all']['n'] == len(pairs)


def test_contamination_flags_planted_items_and_spares_clean_ones(tiny):
    corpus = [np.arange(1000, 1400) % 300, np.arange(300)]
    planted = list(corpus[0][100:130])
    near = planted[:10] + [5] + planted[11:25]
    clean = list(range(200, 230))[::-1]
    assert E.contaminated_items(corpus, [planted, near, clean, planted[:10]]) == {0, 1}
    tok, _ = tiny
    text = "Write a Python function that returns the sum of the list xs and then prints it twice."
    docs = [tok.encode("Some preface text. " + text + " And more after it.")]
    rep = E.contamination_report({'bench': [text, "What is 1+1?"]}, docs, tok)
    assert rep['bench']['contaminated'] == 1 and rep['bench']['first'] == [0] and rep['bench']['too_short'] >= 1


def test_eval_cli_refuses_bad_input_clearly(tmp_path, capsys):
    for argv, msg in [([str(tmp_path / 'nope')], 'does not exist'),
                      ([str(tmp_path), '--tasks', 'suite,mmlu'], "unknown task"),
                      ([str(tmp_path), '--n', '0'], '--n must be >= 1')]:
        with pytest.raises(SystemExit) as e: E.eval_cli(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='does not exist'): E.load_for_eval(tmp_path / 'missing')
    with pytest.raises(ValueError, match='unknown evaluation task'): E.evaluate_model(None, None, tasks=('mmlu',))
    with pytest.raises(ValueError, match='unknown evaluation task'): E.evaluate_model(None, None, tasks='suite,mmlu')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='holds no checkpoint'): E.load_for_eval(tmp_path / 'empty')
    with pytest.raises(SystemExit): E.eval_cli([str(tmp_path / 'empty'), '--tasks', 'bpb'])
    assert 'needs a run' in capsys.readouterr().err
    with pytest.raises(ValueError, match='0 <= k <= n'): E.wilson_interval(True, 3)
    with pytest.raises(ValueError, match='ngram must be in'): E.contaminated_items([[1] * 20], [[1] * 20], ngram=14)


def test_a_pipeline_run_gets_its_report_card(tmp_path, capsys):
    "A tiny run (pre-training + SFT) evaluated end to end through the CLI: the card's tables, plot and json."
    from qwen_edu.pipeline import pipeline_cli
    TINY = json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1))
    run = tmp_path / 'run'
    assert pipeline_cli(['--out', str(run), '--stages', 'tokenizer,data,pretrain,sft', '--corpus-size', '200000',
                         '--vocab-size', '512', '--max-steps', '4', '--batch-size', '4', '--seq-len', '32',
                         '--warmup-steps', '1', '--eval-every', '2', '--eval-batches', '1', '--no-progress',
                         '--train-overrides', TINY]) == 0
    capsys.readouterr()
    assert E.eval_cli([str(run), '--n', '3', '--no-humaneval']) == 0
    card = (run / 'eval' / 'report_card.md').read_text()
    assert '| pretrain | sft |' in card and '| arith (n=3) |' in card and 'bits per byte' in card
    assert 'Contamination' in card and (run / 'eval' / 'report_card.png').stat().st_size > 1000
    res = json.loads((run / 'eval' / 'report_card.json').read_text())
    assert set(res['stages']) == {'pretrain', 'sft'} and set(res['stages']['pretrain']) == {'suite', 'fewshot', 'bpb'}
    assert res['contamination']['suite']['n'] == len(E.heldout_suite(n_per_family=3))
    model, tok = E.load_for_eval(run / 'sft')  # one stage alone: the tokenizer found beside it
    assert tok.vocab_size == 512 and model.config.vocab_size >= 512


def test_card_sections_for_one_checkpoint_reward_model_and_long_context(tiny, tmp_path):
    "A card holds whatever the results hold: one checkpoint's suite, a reward model's accuracy, the passkey table."
    tok, model = tiny
    from qwen_edu.reward import RewardModel, make_preference_pairs
    from qwen_edu.tasks import make_examples
    csv = tmp_path / 'passkey.csv'
    csv.write_text("variant,train_len,eval_len,depth,trials,accuracy\nabf,256,256,0.0,20,1.0\nabf,256,256,1.0,20,0.5\n"
                   "abf,256,1024,0.5,20,0.1\nyarn,256,1024,0.5,20,0.6\n")
    assert E.longctx_table(csv) == {'abf': {256: 0.75, 1024: 0.1}, 'yarn': {1024: 0.6}}
    pairs = make_preference_pairs(None, tok, make_examples('arith', 8, seed=1, split='test'))
    res = dict(run='x', n_per_family=2, stages={'ckpt': E.evaluate_model(model, tok, ('suite',), 2)},
               reward=E.evaluate_reward_by_family(RewardModel(model.config), tok, pairs), longctx=E.longctx_table(csv))
    md = E.report_card(res, tmp_path / 'card')
    assert '| family | ckpt |' in md and 'Reward model' in md and '| abf | 0.75 | 0.10 |' in md and '| yarn |  | 0.60 |' in md
    assert (tmp_path / 'card' / 'report_card.png').exists() and 'HumanEval' not in md
    assert E.report_card(dict(stages={'m': {'fewshot': res['stages']['ckpt']['suite']['families']}})).count('##') == 1


def test_paired_difference_is_the_mean_change_with_a_bootstrap_interval():
    "b - a on the same items; identical models give exactly 0 with a zero-width interval; bad input is refused."
    import pytest
    from qwen_edu.eval import paired_difference
    a, b = [0, 1, 0, 1] * 50, [1, 1, 0, 1] * 50          # b fixes a quarter of the items and breaks none
    r = paired_difference(a, b)
    assert r['delta'] == 0.25 and r['n'] == 200 and r['ci95'][0] < 0.25 < r['ci95'][1] and r['ci95'][0] > 0.1
    assert paired_difference(a, a) == dict(delta=0.0, ci95=[0.0, 0.0], n=200)
    # pairing matters: the same two accuracies with the changes on different items give a wider interval
    c = [1, 0, 1, 1] * 50                                  # also 0.75, but it breaks items a got right
    wide = paired_difference(a, c)
    assert wide['delta'] == 0.25 and wide['ci95'][1] - wide['ci95'][0] > r['ci95'][1] - r['ci95'][0]
    with pytest.raises(ValueError, match='equal-length'): paired_difference([1, 0], [1])
