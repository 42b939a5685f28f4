"""Verifiable tasks: generators are deterministic, reference solutions pass, wrong answers fail, the sandbox
contains infinite loops, memory hogs, fork bombs and writes outside its temporary directory."""
import os, random, time
from pathlib import Path
import pytest
from qwen_edu.tasks import (TASKS, Example, answers_match, check_answer, check_code, check_constraint, check_instruct,
                            extract_answer, extract_code, gen_code, make_examples, run_python, score)


@pytest.mark.parametrize('task', sorted(TASKS))
@pytest.mark.parametrize('level', [1, 2])
def test_reference_solutions_pass_and_generation_is_seeded(task, level):
    n = 8 if task == 'code' else 60
    a, b = make_examples(task, n, seed=3, level=level), make_examples(task, n, seed=3, level=level)
    assert [e.prompt for e in a] == [e.prompt for e in b] and [e.solution for e in a] == [e.solution for e in b]
    assert [e.prompt for e in make_examples(task, n, seed=4, level=level)] != [e.prompt for e in a]
    assert all(score(e, e.solution) == 1.0 for e in a)
    assert all(score(e, "") == 0.0 for e in a)


def test_wrong_answers_fail():
    for e in make_examples(['arith', 'word', 'table'], 50, seed=0, level=2):
        if e.task == 'table' and e.meta['kind'] == 'argmax':
            wrong = next(r['item'] for r in e.meta['rows'] if r['item'] != e.answer)
        else: wrong = str(int(e.answer) + 1)
        assert not check_answer(e, f"Answer: {wrong}") and check_answer(e, f"blah \\boxed{{{e.answer}}}")


def test_answer_extraction_and_normalisation():
    assert extract_answer("Answer: 3\nAnswer: 42.") == "42."
    assert extract_answer("\\boxed{7} then Answer: 8") == "7"
    assert answers_match("42.", "42") and answers_match("1,234", "1234") and answers_match("0.5", "1/2")
    assert answers_match("-3", "-3.0") and not answers_match("3", "-3") and not answers_match("", "0")
    with pytest.raises(TypeError, match='expects a str'): extract_answer(3)


def test_heldout_split_is_disjoint_and_stable():
    tr = {e.prompt for e in make_examples('arith', 300, seed=0, level=2, split='train')}
    te = {e.prompt for e in make_examples('arith', 100, seed=1, level=2, split='test')}
    assert tr and te and not tr & te


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"): make_examples('nope', 1)
    with pytest.raises(ValueError, match='level must be'): make_examples('arith', 1, level=0)
    with pytest.raises(ValueError, match='split must be'): make_examples('arith', 1, split='val')
    with pytest.raises(ValueError, match='unknown constraint'): check_constraint('rhyme', 'x')


def test_instruction_constraints():
    assert check_constraint('lower', 'all lower here') and not check_constraint('lower', 'Not lower')
    assert check_constraint('upper', 'ALL UP') and not check_constraint('upper', '123')
    assert check_constraint('json', '```json\n{"a": 1, "b": [2]}\n```', keys=['a', 'b'])
    assert not check_constraint('json', '{"a": 1}', keys=['a', 'b']) and not check_constraint('json', 'nope', keys=['a'])
    assert check_constraint('bullets', '* one\n- two\n-three', n=2)
    assert not check_constraint('keyword', 'seashore', word='sea') and check_constraint('keyword', 'by the sea.', word='sea')
    assert check_constraint('words', "it's a cat", n=3)


def test_code_checker_runs_tests_in_sandbox():
    ex = gen_code(random.Random(0), 1)
    assert check_code(ex, ex.solution) and check_code(ex, extract_code(ex.solution))
    assert not check_code(ex, ex.solution.replace('return', 'return -1 + '))
    loop = Example('code', '', '', '', 1, {'tests': ['assert f() == 1']})
    t0 = time.monotonic()
    assert not check_code(loop, 'def f():\n    while True: pass', timeout=1)
    assert time.monotonic() - t0 < 10


# ---- the sandbox ------------------------------------------------------------------------------------------

def test_sandbox_runs_code_and_reports_errors():
    r = run_python("import math\nprint(math.factorial(5))")
    assert r.ok and r.stdout == "120\n"
    r = run_python("raise SystemExit(3)")
    assert r.returncode == 3 and not r.ok
    r = run_python("1/0")
    assert not r.ok and 'ZeroDivisionError' in r.stderr
    with pytest.raises(TypeError): run_python(None)
    with pytest.raises(ValueError): run_python("pass", timeout=0)


def test_sandbox_kills_infinite_loop_and_its_process_group():
    t0 = time.monotonic()
    r = run_python("while True: pass", timeout=1)
    assert r.timed_out and r.returncode is None and time.monotonic() - t0 < 8
    r = run_python("import time\ntime.sleep(60)", timeout=1)  # wall-clock, not CPU, timeout
    assert r.timed_out


def test_sandbox_memory_limit():
    r = run_python("x = bytearray(600 * 2**20)\nprint('allocated')", memory_mb=256)
    assert not r.ok and 'MemoryError' in r.stderr and 'allocated' not in r.stdout


def test_sandbox_fork_bomb_is_contained():
    t0 = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()", timeout=3)
    assert not r.ok and time.monotonic() - t0 < 10
    for src in ("import subprocess\nsubprocess.run(['sleep', '100'])", "import os\nos.system('sleep 100')",
                "import multiprocessing", "import ctypes"):
        r = run_python(src, timeout=3)
        assert not r.ok and not r.timed_out and 'sandbox' in r.stderr, src


def test_sandbox_cannot_touch_files_outside_its_temp_dir(tmp_path):
    target = tmp_path / 'precious.txt'; target.write_text('weights')
    for src in (f"open({str(target)!r}, 'w').write('gone')", f"import os\nos.remove({str(target)!r})",
                f"from pathlib import Path\nPath({str(target)!r}).write_text('x')",
                f"print(open({str(target)!r}).read())",  # reading training files is refused too
                f"import os\nos.rename({str(target)!r}, 'stolen.txt')",
                f"open({str(tmp_path / 'new.txt')!r}, 'x')"):
        r = run_python(src)
        assert not r.ok and 'outside the sandbox' in r.stderr, src
    assert target.read_text() == 'weights' and sorted(p.name for p in tmp_path.iterdir()) == ['precious.txt']
    # relative writes land in the sandbox's private tmpfs working directory, which vanishes with it
    cwd_before = set(os.listdir('.'))
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())")
    assert r.ok and r.stdout == '/sandbox\n' and not Path('/sandbox').exists()
    assert set(os.listdir('.')) == cwd_before


def test_sandbox_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'secret-token')
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.ok and 'HF_TOKEN' not in r.stdout and 'secret' not in r.stdout


def test_sandbox_output_is_bounded():
    r = run_python("import sys\nwhile True: sys.stdout.write('x' * 4096)", timeout=5, max_output_bytes=10000)
    assert not r.ok and not r.timed_out and len(r.stdout) <= 10000
