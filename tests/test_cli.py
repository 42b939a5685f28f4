

def test_console_script_lists_commands():
    from qwen_edu.cli import main
    assert main(['--help']) == 0


def test_unknown_command_is_a_clear_error(capsys):
    from qwen_edu.cli import main
    assert main(['frobnicate']) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
