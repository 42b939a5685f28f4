"""Reward model: the Bradley-Terry loss and accuracy equal their formulas; bad input fails clearly."""
import math
import pytest
import torch
from qwen_edu.reward import bt_loss, preference_accuracy


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def test_bt_loss_matches_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    c = (torch.randn(10, generator=g) * 3).requires_grad_(); r = torch.randn(10, generator=g) * 3
    loss = bt_loss(c, r)
    assert abs(loss.item() - sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / 10) < 1e-5
    loss.backward()
    assert torch.allclose(c.grad, -torch.sigmoid(r - c.detach()) / 10, atol=1e-6)


def test_accuracy():
    assert preference_accuracy(torch.tensor([1., 1, 3, 0]), torch.tensor([0., 1, 2, 5])) == 0.5  # ties count as wrong


def test_bad_inputs():
    with pytest.raises(ValueError, match='same shape'): bt_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match='non-empty'): preference_accuracy(torch.zeros(0), torch.zeros(0))


# ---- the model and pairs --------------------------------------------------------------------------------------
import transformers
from qwen_edu.config import QwenConfig
from qwen_edu.hf import config_to_hf
from qwen_edu.reward import RewardModel, make_preference_pairs, corrupt_answer, train_reward_model, evaluate_reward_model
from qwen_edu.tasks import make_examples, score


def _cfg():
    return QwenConfig.from_preset('edu-tiny', vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)


def test_reward_model_matches_transformers_sequence_classification():
    torch.manual_seed(0)
    rm = RewardModel(_cfg()).eval()
    hf = transformers.Qwen2ForSequenceClassification(
        transformers.Qwen2Config(**{**config_to_hf(_cfg()), 'num_labels': 1, 'pad_token_id': 0})).eval()
    missing, unexpected = hf.load_state_dict(rm.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(1, 101, (3, 9)); ids[0, 6:] = 0; ids[2, 4:] = 0  # right padding with pad id 0
    am = (ids != 0).long()
    with torch.no_grad():
        assert torch.allclose(rm(ids, am), hf(ids, attention_mask=am).logits[:, 0], atol=1e-5)


def test_reward_reads_last_real_token_and_copies_backbone():
    from qwen_edu.model import QwenForCausalLM
    torch.manual_seed(1)
    lm = QwenForCausalLM(_cfg())
    rm = RewardModel.from_causal_lm(lm).eval()
    for k, v in lm.model.state_dict().items(): assert torch.equal(v, rm.model.state_dict()[k])
    ids = torch.randint(0, 101, (2, 5))
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    am = torch.cat([torch.ones(2, 5), torch.zeros(2, 4)], 1).long()
    with torch.no_grad(): assert torch.allclose(rm(padded, am), rm(ids), atol=1e-5)
    with pytest.raises(ValueError, match='all zeros'): rm(ids, torch.zeros_like(ids))


def test_pairs_are_labelled_by_the_checker():
    import random
    pairs = make_preference_pairs(None, None, make_examples(['arith', 'word', 'table'], 30, seed=0))
    assert len(pairs) >= 25
    for p in pairs: assert score(p.example, p.chosen) == 1.0 and score(p.example, p.rejected) == 0.0
    ex = make_examples('arith', 1, seed=0)[0]
    assert corrupt_answer(ex, 'no digits', random.Random(0)) is None


def test_reward_model_learns_pairs():
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer(vocab_size=300, n=60)
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(toy_model(tok, hidden_size=32))
    pairs = make_preference_pairs(None, tok, make_examples('arith', 8, seed=0))
    before = evaluate_reward_model(rm, tok, pairs)
    train_reward_model(rm, tok, pairs, steps=40, batch_size=8, lr=3e-3)
    after = evaluate_reward_model(rm, tok, pairs)  # it can at least fit 8 pairs
    assert after[0] < before[0] / 2 and after[1] >= 0.75, (before, after)  # ~0.69 -> ~0.10 in 40 steps


def test_preference_pairs_skip_samples_that_cannot_be_an_assistant_turn(monkeypatch, tmp_path):
    "A sampled response starting with a newline merges with '<|im_start|>assistant\\n' when tokenized: never a pair side."
    import qwen_edu.sft as S
    from qwen_edu.data import train_builtin_tokenizer
    from qwen_edu.reward import make_preference_pairs
    from qwen_edu.tasks import make_examples, score
    from qwen_edu.tokenizer import BPETokenizer
    tok = BPETokenizer.from_hf(train_builtin_tokenizer(tmp_path / 'tok', 512, 200_000)['tokenizer'])  # has '\\n\\n'
    ex = make_examples('arith', 1, seed=0)[0]
    answer = ex.solution
    with pytest.raises(ValueError, match='does not tokenize apart'):  # what made the pipeline's DPO stage fail
        S.tokenize_conversation(tok, S.example_messages(ex, '\n' + answer))
    monkeypatch.setattr(S, 'generate_responses', lambda m, t, exs, k, *a, **kw: [['\n' + answer, 'nonsense', answer]])
    pairs = make_preference_pairs(object(), tok, [ex], k=3)
    assert len(pairs) == 1 and pairs[0].chosen == answer and pairs[0].rejected == 'nonsense'
    assert score(ex, '\n' + answer) == 1.0  # the checker would have accepted it: the filter is the chat format's
    S.tokenize_conversation(tok, S.example_messages(ex, pairs[0].chosen))


# ---- the reward model's pairs: varied rejections --------------------------------------------------------------
def test_reward_pairs_kinds_are_what_they_say():
    import re
    from qwen_edu.reward import make_reward_pairs, corrupt_response, REJECTION_KINDS
    from qwen_edu.tasks import extract_answer
    exs = make_examples(['arith', 'word'], 60, seed=0) + make_examples(['arith', 'word'], 20, seed=0, level=2)
    pairs = make_reward_pairs(exs, kinds=('answer', 'step', 'operand', 'format'), seed=0)
    kinds = {k: [p for p in pairs if p.kind == k] for k in ('answer', 'step', 'operand', 'format')}
    assert all(len(v) >= 20 for v in kinds.values()), {k: len(v) for k, v in kinds.items()}
    for p in pairs:
        assert score(p.example, p.chosen) == 1.0 and score(p.example, p.rejected) == 0.0 and p.chosen == p.example.solution
    for p in kinds['answer']:  # only the final number differs
        assert p.chosen.rsplit('Answer:', 1)[0] == p.rejected.rsplit('Answer:', 1)[0]
    for p in kinds['step']:  # the worked step's result is wrong, and the answer follows it
        last_step = re.findall(r"=(-?\d+)$", p.rejected, re.MULTILINE)[-1]
        assert last_step == extract_answer(p.rejected) != p.example.answer and int(last_step) >= 0
    for p in kinds['operand']:  # a miscopied operand, the arithmetic done right on it, the answer following it
        x, op, y, z = re.findall(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$", p.rejected, re.MULTILINE)[-1]
        x0, _, y0, _ = re.findall(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$", p.chosen, re.MULTILINE)[-1]
        assert {'+': int(x) + int(y), '-': int(x) - int(y), '*': int(x) * int(y)}[op] == int(z) == int(extract_answer(p.rejected))
        assert (x != x0) != (y != y0)  # exactly one operand changed
    for p in kinds['format']: assert extract_answer(p.rejected) is None
    assert not any(p.kind == 'step' and p.example.task == 'arith' and p.example.level == 1 for p in pairs)  # no step there
    assert make_preference_pairs(None, None, exs[:5])[0].kind == ''  # the DPO pairs are unchanged
    with pytest.raises(ValueError, match='pass model='): make_reward_pairs(exs, kinds=REJECTION_KINDS)
    with pytest.raises(ValueError, match='non-empty subset'): make_reward_pairs(exs, kinds=())
    with pytest.raises(ValueError, match="'answer', 'step', 'operand' or 'format'"): corrupt_response(exs[0], 'Answer: 1', 'sample', None)


def test_reward_pairs_with_samples(monkeypatch):
    "'sample' rejections are the model's failing samples; the chosen side is a passing sample when there is one."
    import qwen_edu.sft as S
    from qwen_edu.reward import make_reward_pairs
    tok = S.train_task_tokenizer(vocab_size=300, n=60)
    ex = make_examples('word', 2, seed=0)
    monkeypatch.setattr(S, 'generate_responses', lambda m, t, exs, k, *a, **kw: [['junk', ' ' + exs[0].solution],
                                                                                 [exs[1].solution + ' ']])
    pairs = make_reward_pairs(ex, model=object(), tokenizer=tok, k=2)
    first = [p for p in pairs if p.example is ex[0]]
    assert {p.kind for p in first} == {'sample', 'answer', 'step', 'format'}
    assert all(p.chosen == ' ' + ex[0].solution for p in first) and first[0].rejected == 'junk'
    assert 'sample' not in {p.kind for p in pairs if p.example is ex[1]}  # no failing sample: no such pair


def test_toy_reward_model_trains_on_no_heldout_prompt(monkeypatch):
    "toy_reward_model's training prompts (captured where it makes its pairs) hold none of chapter 13's held-out prompts."
    import qwen_edu.reward as R
    from qwen_edu.sft import train_task_tokenizer, toy_model
    from qwen_edu.tasks import is_heldout
    class Stop(Exception): pass
    seen = {}
    def capture(examples, **kw): seen['examples'] = examples; raise Stop
    monkeypatch.setattr(R, 'make_reward_pairs', capture)
    tok = train_task_tokenizer(vocab_size=300, n=60)
    with pytest.raises(Stop): R.toy_reward_model(tok, toy_model(tok, hidden_size=32))
    train = {e.prompt for e in seen['examples']}
    test = {e.prompt for e in make_examples(['arith', 'word'], 200, seed=11, split='test')}  # the chapter's held-out draw
    assert len(seen['examples']) == 2000 and not train & test and not any(is_heldout(p) for p in train)
    assert {e.prompt for e in make_examples(['arith', 'word'], 2000, seed=10)} & test  # an unsplit draw would share some


def test_reward_model_scores_equal_the_training_forward():
    from qwen_edu.reward import reward_model_scores, pair_batch
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer(vocab_size=300, n=60)
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(toy_model(tok, hidden_size=32)).eval()
    pairs = make_preference_pairs(None, tok, make_examples('word', 5, seed=0))
    s = reward_model_scores(rm, tok, [p.example for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                            batch_size=3)
    ids, attn, _ = pair_batch(tok, pairs)
    with torch.no_grad(): assert torch.allclose(torch.tensor(s), rm(ids, attn), atol=1e-5)
    assert len(reward_model_scores(rm, tok, [pairs[0].example], ['\n' + pairs[0].chosen])) == 1  # any text gets a score
    with pytest.raises(ValueError, match='2 examples but 1 responses'): reward_model_scores(rm, tok, [pairs[0].example] * 2, ['x'])


def test_toy_reward_model_is_cached_as_safetensors(tmp_path):
    from qwen_edu.reward import toy_reward_model
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer(vocab_size=300, n=60)
    torch.manual_seed(0)
    sft = toy_model(tok, hidden_size=32)
    kw = dict(n_train=4, k=2, steps=2, batch_size=4)
    rm, hist = toy_reward_model(tok, sft, tmp_path, **kw)
    assert hist is not None and len(list(tmp_path.glob('toy_reward_*.safetensors'))) == 1
    again, hist2 = toy_reward_model(tok, sft, tmp_path, **kw)  # from the cache: the same weights, no training
    assert hist2 is None and all(torch.equal(v, again.state_dict()[k]) for k, v in rm.state_dict().items())
    assert any(not torch.equal(v, again.model.state_dict()[k]) for k, v in sft.model.state_dict().items())  # it trained
