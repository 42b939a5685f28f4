

def test_console_script_lists_commands():
    from qwen_edu.cli import main
    assert main(['--help']) == 0


def test_unknown_command_is_a_clear_error(capsys):
    from qwen_edu.cli import main
    assert main(['frobnicate']) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def _declared_torch_minimum():
    import configparser, re
    from pathlib import Path
    ini = configparser.ConfigParser()
    ini.read(Path(__file__).parents[1] / 'settings.ini')
    m = re.search(r'(?:^|\s)torch>=([\d.]+)(?:\s|$)', ini['DEFAULT']['requirements'])
    assert m, "settings.ini requirements must declare torch>=X.Y"
    return tuple(int(x) for x in m.group(1).split('.'))


def test_declared_torch_minimum_is_what_the_code_needs():
    "settings.ini's torch>=X.Y equals the newest minimum among the torch features the package requires."
    from qwen_edu.cli import TORCH_FEATURES, torch_minimum
    need = max(tuple(int(x) for x in v.split('.')) for v, _, required in TORCH_FEATURES.values() if required)
    assert torch_minimum() == '.'.join(map(str, need))
    assert _declared_torch_minimum() == need


def test_torch_feature_table_describes_the_code():
    "Each listed feature is used in the package; the optional ones only behind a hasattr guard."
    from pathlib import Path
    import qwen_edu
    from qwen_edu.cli import TORCH_FEATURES
    src = {p.name: p.read_text() for p in Path(qwen_edu.__file__).parent.glob('*.py') if p.name not in ('_modidx.py', 'cli.py')}  # cli.py holds the table
    for pattern, (version, where, required) in TORCH_FEATURES.items():
        users = [n for n, s in src.items() if pattern in s]
        assert users, f"{pattern!r} (torch {version}) is listed but not used any more: remove it from TORCH_FEATURES"
        if not required:
            name = pattern.split('.')[-1].rstrip('(')
            assert all(f"hasattr(F, '{name}')" in src[n] for n in users), f"{pattern} must be guarded in {users}"


def test_info_shows_torch_and_memory(capsys):
    import torch
    from qwen_edu.cli import main, torch_minimum
    assert main(['info']) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__} (needs >= {torch_minimum()})" in out and 'memory available' in out


def test_user_errors_are_messages_not_tracebacks(tmp_path):
    "A bad flag value through `qwen-edu train` and `python -m qwen_edu.train` prints one error line (exit 1), no traceback."
    import os, subprocess, sys
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('QWEN_EDU_DEBUG', None)
    for cmd in ([sys.executable, '-c', 'import sys; from qwen_edu.cli import main; sys.exit(main())', 'train'], [sys.executable, '-m', 'qwen_edu.train']):
        r = subprocess.run(cmd + ['--lr', 'inf', '--max-steps', '2', '--data', str(tmp_path / 'none')],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, (cmd, r.returncode, r.stderr)
        assert 'error: lr must be a finite number' in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not (tmp_path / 'runs').exists()  # refused before any work
    r = subprocess.run([sys.executable, '-m', 'qwen_edu.train', '--lr', 'inf', '--data', str(tmp_path / 'none')],
                       cwd=tmp_path, env={**env, 'QWEN_EDU_DEBUG': '1'}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' in r.stderr  # the traceback on request
