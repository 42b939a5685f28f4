"""SFT: the assistant mask covers exactly the assistant's content and <|im_end|>, piecewise tokenization equals
whole-text tokenization, the loss counts exactly the assistant tokens, packing resets positions (and leaks across
conversations, as documented), the cached sampler equals uncached greedy decoding, rejection sampling keeps only
passing responses, and malformed conversations fail clearly."""
import pytest
import torch
import torch.nn.functional as F
from qwen_edu.chat import apply_chat_template
from qwen_edu.sft import (assistant_mask, example_messages, generate_responses, pack_conversations, prompt_ids,
                          rejection_sample, sample, sft_batch, sft_train, tokenize_conversation, toy_model,
                          train_task_tokenizer, lr_schedule, run_sft)
from qwen_edu.tasks import make_examples, score
from qwen_edu.tokenizer import BPETokenizer


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


@pytest.fixture(scope='module')
def tok():
    return train_task_tokenizer(vocab_size=320, n=100)


@pytest.fixture(scope='module')
def model(tok):
    torch.manual_seed(0)
    return toy_model(tok, hidden_size=32).eval()


def test_assistant_mask_is_exactly_assistant_content_and_im_end(tok):
    msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2=?'},
            {'role': 'assistant', 'content': 'Answer: 4'}, {'role': 'user', 'content': 'and 3+3=?'},
            {'role': 'assistant', 'content': ' six\n'}]
    ids, mask = tokenize_conversation(tok, msgs)
    assert ids == tok.encode(apply_chat_template(msgs), allowed_special='all')
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    im_end, im_start = tok.special_tokens['<|im_end|>'], tok.special_tokens['<|im_start|>']
    # the masked runs decode to each assistant content followed by <|im_end|>
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m: cur.append(i)
        elif cur: runs.append(cur); cur = []
    if cur: runs.append(cur)
    assert [tok.decode(r) for r in runs] == ['Answer: 4<|im_end|>', ' six\n<|im_end|>']
    # every <|im_start|> and the 'assistant\n' header are unmasked; the only masked <|im_end|> close assistant turns
    assert all(m == 0 for i, m in zip(ids, mask) if i == im_start)
    assert sum(m for i, m in zip(ids, mask) if i == im_end) == 2
    assert assistant_mask(tok, msgs) == mask


def test_no_assistant_turn_gives_zero_mask(tok):
    ids, mask = tokenize_conversation(tok, [{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)
    assert sum(mask) == 0 and tok.decode(ids).endswith('<|im_start|>assistant\n')


def test_malformed_conversations(tok):
    with pytest.raises(ValueError, match="unknown role 'bot'"): assistant_mask(tok, [{'role': 'bot', 'content': 'x'}])
    with pytest.raises(ValueError, match="no 'content' string"): assistant_mask(tok, [{'role': 'user', 'content': None}])
    with pytest.raises(TypeError, match='must be a dict'): assistant_mask(tok, ['hello'])
    with pytest.raises(ValueError, match='non-empty list'): assistant_mask(tok, [])
    plain = BPETokenizer.train(['abc abc'], 260)
    with pytest.raises(ValueError, match='has no <|im_start|> token'):
        assistant_mask(plain, [{'role': 'user', 'content': 'x'}])


def test_loss_counts_exactly_assistant_tokens(tok, model):
    convs = [tokenize_conversation(tok, example_messages(e)) for e in make_examples('word', 3, seed=0)]
    x, y, am = sft_batch(convs, tok.eos_id)
    out = model(x, labels=y, attention_mask=am)
    # independent: cross-entropy of each assistant token given everything before it
    total, n = 0.0, 0
    for b, (ids, m) in enumerate(convs):
        logits = model(torch.tensor([ids])).logits[0]
        for t in range(1, len(ids)):
            if m[t]: total += F.cross_entropy(logits[t - 1:t], torch.tensor([ids[t]])).item(); n += 1
    assert n == sum(sum(m) for _, m in convs)
    assert abs(out.loss.item() - total / n) < 1e-4


def test_packing_resets_positions_and_first_conversation_is_exact(tok, model):
    convs = [tokenize_conversation(tok, example_messages(e)) for e in make_examples('arith', 2, seed=2)] * 2
    L = sum(len(i) for i, _ in convs[:2])
    x, y, pos = pack_conversations(convs, L, tok.eos_id)
    assert x.shape == (2, L)
    n0 = len(convs[0][0])
    assert pos[0, :n0].tolist() == list(range(n0)) and pos[0, n0] == 0
    assert (y != -100).sum().item() == sum(sum(m) for _, m in convs) - sum(m[0] for _, m in convs)
    with torch.no_grad():
        packed = model(x, position_ids=pos).logits
        alone = model(torch.tensor([convs[0][0]])).logits
    assert torch.allclose(packed[0, :n0], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match='does not fit'): pack_conversations(convs, 3, 0)


def test_cached_sampler_matches_uncached_greedy(tok, model):
    exs = make_examples('arith', 3, seed=3)
    prompts = [prompt_ids(tok, e) for e in exs]
    prompts[1] = prompts[1][2:]  # ragged lengths exercise left padding
    got = sample(model, prompts, max_new_tokens=6, temperature=0, stop_id=None)
    for p, g in zip(prompts, got):
        ids = list(p)
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert g == ids[len(p):]


def test_rejection_sampling_keeps_only_passing(tok, model):
    exs = make_examples('arith', 4, seed=4)
    kept = rejection_sample(model, tok, exs, k=4, keep=2, max_new_tokens=6)
    assert all(score(e, e.solution) == 1.0 for e in kept)
    assert len(generate_responses(model, tok, exs, n=3, max_new_tokens=4)[0]) == 3


def test_lr_schedule_decays_tenfold():
    assert lr_schedule(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_schedule(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_schedule(100, 100, 1.0, warmup=10) == pytest.approx(0.1)


def test_sft_reduces_loss_and_run_sft_writes_outputs(tok, tmp_path):
    m = toy_model(tok, hidden_size=32)
    losses = sft_train(m, tok, make_examples('arith', 50, seed=0), steps=25, batch_size=8, lr=3e-3)
    assert sum(losses[-5:]) / 5 < losses[0] * 0.7
    metrics = run_sft(m, tok, out_dir=tmp_path, steps=2, n_train=20, n_eval=4, batch_size=4)
    assert set(metrics) >= {'heldout_accuracy_before', 'heldout_accuracy_after'}
    assert (tmp_path / 'sft_model.pt').exists() and (tmp_path / 'sft_metrics.json').exists()
