"torch.compile: a training step of dense and MoE models traces without graph breaks and matches eager; the package's imports form layers."
import ast, warnings
from pathlib import Path
import pytest, torch
from qwen_edu.config import QwenConfig
from qwen_edu.model import QwenForCausalLM
from qwen_edu.moe import moe_blocks

warnings.filterwarnings('ignore')
DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
X = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
AM = torch.ones(2, 16, dtype=torch.long); AM[1, :5] = 0


def build(kw, dispatch=None, seed=0):
    torch.manual_seed(seed)
    m = QwenForCausalLM(QwenConfig(**kw))
    if dispatch:
        for b in moe_blocks(m): b.dispatch = dispatch
    return m


def explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize('kind', ['dense', 'moe', 'moe_padded'])
@pytest.mark.parametrize('return_logits', [True, False])
def test_training_step_has_no_graph_breaks(kind, return_logits):
    "Today's code broke 6 (dense) / 12 (MoE) times: host-reading input checks, bincount, int(counts.max())."
    m = build(DENSE if kind == 'dense' else MOE, 'padded' if kind == 'moe_padded' else None)
    def step(x, am):
        out = m(x, labels=x, attention_mask=am, return_logits=return_logits)
        out.loss.backward()
        return out.loss
    for am in (None, AM):  # plain rows, and a padding mask (the SFT batches)
        e = explain(step, X, am)
        assert e.graph_break_count == 0, [b.reason for b in e.break_reasons]
        assert e.graph_count == 1


def test_bf16_autocast_step_has_no_graph_breaks():
    "Under bf16 autocast the MoE experts run as grouped matmuls in bf16, still in one graph."
    m = build(MOE)
    def step(x):
        with torch.autocast('cpu', dtype=torch.bfloat16): return m(x, labels=x, return_logits=False).loss
    e = explain(step, X)
    assert e.graph_break_count == 0, [b.reason for b in e.break_reasons]
    ops = [str(n.target) for g in e.graphs for n in g.graph.nodes]
    assert any('grouped_mm' in o for o in ops)


@pytest.mark.parametrize('kind', ['dense', 'moe', 'moe_padded'])
def test_compiled_loss_and_grads_match_eager(kind):
    kw = DENSE if kind == 'dense' else MOE
    eager, comp = build(kw), build(kw)
    if kind == 'moe_padded':
        for b in moe_blocks(eager) + moe_blocks(comp): b.dispatch = 'padded'
    torch._dynamo.reset()
    fwd = torch.compile(comp, backend='aot_eager', fullgraph=True)
    for am in (None, AM):
        for m in (eager, comp): m.zero_grad()
        le = eager(X, labels=X, attention_mask=am).loss
        lc = fwd(X, labels=X, attention_mask=am).loss
        le.backward(); lc.backward()
        torch.testing.assert_close(lc, le, atol=1e-4, rtol=1e-4)
        for (n, a), b in zip(eager.named_parameters(), comp.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=n)
    if kind != 'dense':  # the load counters saw the same tokens
        for a, b in zip(moe_blocks(eager), moe_blocks(comp)): assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)


def test_eager_calls_still_check_values():
    m = build(DENSE)
    with pytest.raises(ValueError, match='token ids must be in'): m(X + 200)
    bad = X.clone(); bad[0, 3] = -3
    with pytest.raises(ValueError, match='labels must be token ids'): m(X, labels=bad)


# --- layering: the package's imports form layers (nothing imports upward, no cycles) ---
PKG = Path(__file__).resolve().parent.parent / 'qwen_edu'
LAYERED = ['config', 'rope', 'layers', 'fastbpe', 'tokenizer', 'moe_dispatch', 'moe', 'fastloss', 'model', 'hf']


def imports_of(name: str) -> tuple[set, set]:
    "(module-level, function-level) qwen_edu modules imported by qwen_edu/<name>.py."
    tree = ast.parse((PKG / f'{name}.py').read_text())
    top, lazy = set(), set()
    def targets(node):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level:  # from .x import y / from . import x
                return {mod.split('.')[0]} if mod else {a.name for a in node.names}
            if mod.startswith('qwen_edu.'): return {mod.split('.')[1]}
            if mod == 'qwen_edu': return {a.name for a in node.names}
        if isinstance(node, ast.Import):
            return {a.name.split('.')[1] for a in node.names if a.name.startswith('qwen_edu.')}
        return set()
    for node in tree.body: top |= targets(node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node): lazy |= targets(sub)
    return top - {name}, lazy - {name}


def test_no_import_cycles():
    "config/rope/layers/tokenizer at the bottom, then moe, model, hf: every import (even inside a function) goes down."
    graph = {}
    for name in LAYERED:
        top, lazy = imports_of(name)
        graph[name] = {m for m in top | lazy if m in LAYERED}
    state = {}
    def visit(n, path):
        if state.get(n) == 'done': return
        assert state.get(n) != 'open', f"import cycle: {' -> '.join(path + [n])}"
        state[n] = 'open'
        for m in graph[n]: visit(m, path + [n])
        state[n] = 'done'
    for n in LAYERED: visit(n, [])
    assert graph['config'] == set() and graph['layers'] == set() and graph['fastbpe'] == set() and graph['moe_dispatch'] == set()
    assert graph['fastloss'] == set(), graph['fastloss']  # appendix A8's loss: below model, imports nothing of ours
    assert graph['moe'] <= {'config', 'layers', 'moe_dispatch'}, graph['moe']
    assert 'hf' not in graph['model'] and 'model' not in graph['moe']


def test_presets_need_no_moe_import():
    "QwenConfig.from_preset knows the MoE presets without importing qwen_edu.moe (no import-time registration)."
    import subprocess, sys
    code = ("import sys; from qwen_edu.config import QwenConfig; c = QwenConfig.from_preset('edu-moe-tiny'); "
            "assert c.num_experts == 16; assert 'qwen_edu.moe' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.stdout.strip() == 'ok', r.stderr[-2000:]


@pytest.mark.parametrize('kind', ['dense', 'moe'])
def test_activation_checkpointing_compiles_and_matches_eager(kind):
    "Checkpointed blocks trace as one graph too (the MoE load counter is an in-place add, counted once)."
    kw = DENSE if kind == 'dense' else MOE
    ref, m = build(kw), build(kw).set_activation_checkpointing(True)
    e = explain(lambda x: m(x, labels=x, return_logits=False).loss, X)
    assert e.graph_break_count == 0, [b.reason for b in e.break_reasons]
    for b in moe_blocks(m): b.tokens_per_expert.zero_()
    torch._dynamo.reset()
    lc = torch.compile(m, backend='aot_eager', fullgraph=True)(X, labels=X, return_logits=False).loss
    lr = ref(X, labels=X).loss
    lc.backward(); lr.backward()
    torch.testing.assert_close(lc, lr, atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(ref.named_parameters(), m.parameters()): torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=n)
    for a, b in zip(moe_blocks(ref), moe_blocks(m)): assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
