"""The code sandbox (`run_python`) against the escapes a reviewer found in the audit-hook-only version (issue #11):
dir_fd path tricks, rewriting the audit hook's closure through `gc`, killing the scoring process, setsid() children
outliving the timeout, reading host files, the network, sqlite3 files outside, leaked environment variables.

On Linux these run under the real bubblewrap backend and FAIL (not skip) when it is missing: CI installs it."""
import os, shutil, signal, socket, subprocess, sys, tempfile, textwrap, threading, time, uuid
from pathlib import Path
import pytest
from qwen_edu import tasks
from qwen_edu.tasks import run_python, sandbox_backend

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason="the OS sandbox needs Linux namespaces")
REPO = Path(__file__).resolve().parents[1]

# Finds the audit hook with gc and empties its closure: after this the inner layer refuses nothing.
DISABLE_HOOK = textwrap.dedent("""
    import gc
    n = 0
    for o in gc.get_objects():
        if type(o).__name__ == 'function' and o.__name__ == 'hook' and o.__closure__:
            for name, cell in zip(o.__code__.co_freevars, o.__closure__):
                if name in ('banned', 'fs_events'): cell.cell_contents = set()
                elif name == 'no_import': cell.cell_contents = ()
                elif name == 'root': cell.cell_contents = '/'
                elif name == 'read_ok': cell.cell_contents = ('/',)
                elif name == 'inside': cell.cell_contents = lambda p, roots: True
            n += 1
    import ctypes  # refused by the hook unless it is really disabled
    print('HOOK_DISABLED', n, flush=True)
""")


def escaped(code, **kw):
    "Run `code` after disabling the audit hook; return the result (the OS layer alone must contain it)."
    r = run_python(DISABLE_HOOK + textwrap.dedent(code), **kw)
    assert 'HOOK_DISABLED 1' in r.stdout, r  # the inner layer really is off: what follows tests the namespaces
    return r


def test_backend_is_bubblewrap():
    assert sandbox_backend() == 'bwrap', f"no OS sandbox: {tasks._setup.get('why')} (apt-get install bubblewrap)"


def test_honest_programs_pass():
    r = run_python("import math, json, decimal, fractions, itertools, re, collections\nprint(math.factorial(5))")
    assert r.ok and r.stdout == "120\n" and r.stderr == ""
    r = run_python("open('scratch.txt', 'w').write('ok')\nimport os\nprint(open('scratch.txt').read(), os.getcwd())")
    assert r.ok and r.stdout == "ok /sandbox\n"
    r = run_python("raise ValueError('bad input')")
    assert not r.ok and r.returncode == 1 and 'ValueError: bad input' in r.stderr
    r = run_python("import time\ntime.sleep(30)", timeout=1)
    assert r.timed_out and r.returncode is None and r.seconds < 5


def test_dir_fd_and_symlinks_cannot_reach_host_files():
    host = Path('/etc/passwd').read_text()
    r = escaped("""
        import os
        os.symlink('/', 'up')
        for base, rel in (('/usr/lib', 'python3/../../../etc/passwd'), ('.', 'up/etc/passwd'), ('/', 'etc/passwd')):
            try:
                fd = os.open(rel, os.O_RDONLY, dir_fd=os.open(base, os.O_RDONLY))
                print('ESCAPED', os.read(fd, 100))
            except OSError as e: print('refused', type(e).__name__)
        for p in ('/root', '/home', '/etc', '/work', '/proc'):
            print(p, os.path.exists(p))
        print(sorted(os.listdir('/')))
        """)
    assert 'ESCAPED' not in r.stdout and host.splitlines()[0] not in r.stdout
    assert r.stdout.count('refused') == 3 and ' True' not in r.stdout
    assert "['dev', 'lib64', 'opt', 'sandbox']" in r.stdout


def test_parent_environment_and_processes_are_invisible(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_secret_value')
    r = escaped(f"""
        import os
        print(sorted(os.environ))
        for pid in (1, {os.getpid()}, {os.getppid()}):
            try: print('ESCAPED', open(f'/proc/{{pid}}/environ', 'rb').read()[:50])
            except OSError as e: print('refused', type(e).__name__)
        print('ppid', os.getppid(), 'pid', os.getpid())
        """)
    assert 'ESCAPED' not in r.stdout and 'hf_secret' not in r.stdout and 'HF_TOKEN' not in r.stdout
    assert "['HOME', 'LANG', 'LD_LIBRARY_PATH', 'PATH', 'PWD', 'TMPDIR']" in r.stdout and 'ppid 0 pid 1' in r.stdout


def test_cannot_signal_the_scoring_process():
    me = os.getpid()
    r = escaped(f"""
        import os, signal
        for pid in ({me}, {os.getppid()}):  # the test process and its parent
            try: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL); print('ESCAPED', pid)
            except OSError as e: print('refused', type(e).__name__)
            try: os.kill(pid, signal.SIGKILL); print('ESCAPED', pid)
            except OSError as e: print('refused', type(e).__name__)
        """)
    assert 'ESCAPED' not in r.stdout and r.stdout.count('refused') == 4 and r.ok
    assert os.getpid() == me  # still alive


def _alive_with(marker):
    "Host pids whose command line contains `marker`."
    out = []
    for p in Path('/proc').iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / 'cmdline').read_bytes(): out.append(int(p.name))
            except OSError: pass
    return out


def test_setsid_children_die_with_the_sandbox():
    marker = f"sandbox-orphan-{uuid.uuid4().hex}"
    child = f"import os, time\nos.setsid()\ntime.sleep(60)\n# {marker}"
    code = f"""
        import os, sys, time
        for _ in range(2):
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, '-c', {child!r}])
        time.sleep(0.5)
        print('children started', flush=True)
        """
    for timeout, wait in ((2, 'time.sleep(60)'), (5, 'pass')):  # killed at the timeout / the code returned
        r = escaped(code + "\n        " + wait, timeout=timeout, max_procs=4)
        assert 'children started' in r.stdout and r.timed_out == (wait != 'pass')
        t0 = time.monotonic()
        while _alive_with(marker) and time.monotonic() - t0 < 5: time.sleep(0.05)
        assert _alive_with(marker) == [], "a process outlived its sandbox"


def test_sandbox_dies_with_a_crashed_trainer():
    "The trainer is SIGKILLed mid-run (no cleanup code runs): the sandbox must not live on."
    marker = f"sandbox-abandoned-{uuid.uuid4().hex}"
    code = DISABLE_HOOK + f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])"
    trainer = subprocess.Popen([sys.executable, '-c', f"from qwen_edu.tasks import run_python; run_python({code!r}, timeout=60)"])
    t0 = time.monotonic()
    while not _alive_with(marker):
        assert time.monotonic() - t0 < 30 and trainer.poll() is None, "the sandbox did not start"
        time.sleep(0.05)
    trainer.kill(); trainer.wait()
    t0 = time.monotonic()
    while _alive_with(marker) and time.monotonic() - t0 < 5: time.sleep(0.05)
    assert _alive_with(marker) == [], "the sandbox outlived the trainer"


def test_process_limit_holds_without_the_audit_hook():
    t0 = time.monotonic()
    r = escaped("""
        import os, subprocess, sys
        try: os.fork(); print('ESCAPED fork')
        except OSError as e: print('refused', type(e).__name__)
        try: subprocess.run([sys.executable, '-c', 'pass']); print('ESCAPED subprocess')
        except OSError as e: print('refused', type(e).__name__)
        """)
    assert 'ESCAPED' not in r.stdout and r.stdout.count('refused') == 2
    r = escaped("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout=3, max_procs=20)
    assert time.monotonic() - t0 < 15  # a fork bomb is capped at 20 processes and killed with the namespace


def test_no_network():
    with socket.socket() as srv:
        srv.bind(('127.0.0.1', 0)); srv.listen(1); port = srv.getsockname()[1]
        r = escaped(f"""
            import socket
            for addr in (('127.0.0.1', {port}), ('10.0.0.1', 80), ('8.8.8.8', 53)):
                try: socket.create_connection(addr, timeout=2); print('ESCAPED', addr)
                except OSError as e: print('refused', type(e).__name__)
            for host in ('localhost', 'example.com'):
                try: print('ESCAPED', socket.getaddrinfo(host, 80))
                except OSError as e: print('refused', type(e).__name__)
            """)
        srv.settimeout(0.1)
        with pytest.raises(socket.timeout): srv.accept()
    assert 'ESCAPED' not in r.stdout and r.stdout.count('refused') == 5


def test_cannot_write_outside_and_sqlite_stays_inside(tmp_path):
    target = tmp_path / 'precious.txt'; target.write_text('weights')
    r = escaped(f"""
        import os, sqlite3
        for p in ({str(target)!r}, {str(tmp_path / 'new.txt')!r}, '/opt/python/x', '/x', '/dev/x', '/tmp/x'):
            try: open(p, 'w').write('gone'); print('ESCAPED', p)
            except OSError as e: print('refused', type(e).__name__)
        for p in ({str(tmp_path / 'x.db')!r}, '/x.db'):
            try: sqlite3.connect(p).execute('create table t (x)'); print('ESCAPED', p)
            except sqlite3.Error as e: print('refused', type(e).__name__)
        """)
    assert 'ESCAPED' not in r.stdout and r.stdout.count('refused') == 8
    assert target.read_text() == 'weights' and sorted(p.name for p in tmp_path.iterdir()) == ['precious.txt']


def test_host_files_repo_and_venv_are_not_visible():
    r = escaped(f"""
        import os
        for p in ({str(REPO)!r}, {sys.prefix!r}, '/root', '/etc/shadow', '/etc/passwd', '/home'):
            try: print('ESCAPED', os.stat(p))
            except OSError as e: print('refused', type(e).__name__)
        try: os.listdir('/root'); print('ESCAPED listdir')
        except OSError as e: print('refused', type(e).__name__)
        for m in ('torch', 'numpy', 'qwen_edu', 'pip'):
            try: __import__(m); print('ESCAPED', m)
            except ImportError: print('refused import')
        """)
    assert 'ESCAPED' not in r.stdout and r.stdout.count('refused') == 11


def test_ctypes_gets_no_privilege():
    r = escaped("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print('open', libc.open(b'/etc/passwd', 0))
        print('setuid', libc.setuid(0), os.getuid())
        print('mount', libc.mount(b'none', b'/sandbox', b'tmpfs', 0, None))
        print('chroot', libc.chroot(b'/'))
        print('unshare', libc.unshare(0x10000000 | 0x00020000))  # CLONE_NEWUSER | CLONE_NEWNS: caps in a nested userns
        """)
    assert r.ok and "open -1\nsetuid -1 65534\nmount -1\nchroot -1\nunshare -1\n" in r.stdout


def test_resource_bombs_are_bounded():
    r = run_python("x = bytearray(600 * 2**20)\nprint('allocated')", memory_mb=256)
    assert not r.ok and 'MemoryError' in r.stderr and 'allocated' not in r.stdout
    r = escaped("import os\nfor i in range(10**6): open(f'f{i}', 'w').write('x' * 60000)", memory_mb=64, timeout=10)
    assert not r.ok and not r.timed_out and 'No space left on device' in r.stderr  # the tmpfs is 64 MB
    r = run_python("import sys\nwhile True: sys.stdout.write('x' * 4096)", max_output_bytes=10000)
    assert not r.ok and not r.timed_out and len(r.stdout) <= 10000


SYSTEM_PY = '/usr/bin/python3'


@pytest.mark.skipif(os.geteuid() != 0 or not Path(SYSTEM_PY).exists() or not Path('/usr/bin/setpriv').exists(),
                    reason="as a non-root user every other test already runs this path; as root it needs setpriv "
                           "and a system python the unprivileged user can read")
def test_unprivileged_caller():
    "The other code path: a non-root trainer, where bwrap makes the user namespace itself (--disable-userns)."
    code = DISABLE_HOOK + textwrap.dedent("""
        import os
        for f in (lambda: open('/etc/passwd').read(), os.fork, lambda: os.stat('/root')):
            try: f(); print('ESCAPED')
            except OSError as e: print('refused', type(e).__name__)
        print('unshare', ctypes.CDLL(None).unshare(0x10000000), 'uid', os.getuid())
        """)
    driver = ("from sandbox_tasks import run_python, sandbox_backend; "
              f"r = run_python({code!r}); print(sandbox_backend(), r.ok, r.stdout, r.stderr)")
    with tempfile.TemporaryDirectory() as d:  # a copy of the (stdlib-only) module where that user can read it
        os.chmod(d, 0o755); shutil.copy(tasks.__file__, Path(d) / 'sandbox_tasks.py')
        out = subprocess.run(['/usr/bin/setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', 'env', '-i',
                              f'PYTHONPATH={d}', SYSTEM_PY, '-c', driver], capture_output=True, text=True,
                             timeout=120, cwd=d)
    assert out.stdout.startswith('bwrap True HOOK_DISABLED 1\n'), out
    assert 'ESCAPED' not in out.stdout and out.stdout.count('refused') == 3 and 'unshare -1 uid 65534' in out.stdout


def test_no_bubblewrap_means_refusal_or_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(tasks, '_setup', {'why': 'bubblewrap (bwrap) is not installed'})
    monkeypatch.delenv(tasks.UNSAFE_ENV, raising=False)
    assert sandbox_backend() == 'none'
    with pytest.raises(tasks.SandboxUnavailableError, match=r"apt-get install bubblewrap.*QWEN_EDU_ALLOW_UNSAFE_SANDBOX=1"):
        run_python("print(1)")
    with pytest.warns(RuntimeWarning, match='WITHOUT OS isolation'):
        assert run_python("print(1)", allow_unsafe=True).stdout == "1\n"
    monkeypatch.setenv(tasks.UNSAFE_ENV, '1')
    with pytest.warns(RuntimeWarning, match='WITHOUT OS isolation'):
        r = run_python(f"open({str(REPO / 'x')!r}, 'w')")  # the audit hook is still there
    assert not r.ok and 'outside the sandbox' in r.stderr


def test_a_bwrap_that_cannot_start_is_no_backend(monkeypatch):
    "Namespaces refused (container runtime, AppArmor, sysctl): the probe notices, and run_python refuses loudly."
    monkeypatch.setattr(tasks, '_setup', {})
    monkeypatch.setattr(tasks, '_bwrap_setup', lambda: {'bwrap': '/bin/false', 'unshare': None, 'seccomp': None,
                                                        'mounts': [], 'ld_path': ''})
    monkeypatch.delenv(tasks.UNSAFE_ENV, raising=False)
    assert sandbox_backend() == 'none' and 'bubblewrap cannot start a sandbox here' in tasks._setup['why']
    with pytest.raises(tasks.SandboxUnavailableError, match='cannot start a sandbox'): run_python("print(1)")


def test_bad_arguments():
    "Every limit is checked before anything starts: a bad value is the caller's error, never a result of the code."
    with pytest.raises(TypeError, match='expects source code as a str'): run_python(b"print(1)")
    bad = [  # (keyword arguments, exception, message)
        (dict(timeout=0), ValueError, r'timeout must be a finite number of seconds > 0 and <= 86400, got 0'),
        (dict(timeout=-1), ValueError, r'timeout must be .* got -1'),
        (dict(timeout=float('nan')), ValueError, r'timeout must be .* got nan'),
        (dict(timeout=float('inf')), ValueError, r'timeout must be .* got inf'),
        (dict(timeout=1e300), ValueError, r'timeout must be .* <= 86400, got 1e\+300'),
        (dict(timeout='5'), TypeError, r"timeout must be a number \(seconds\), got str '5'"),
        (dict(timeout=True), TypeError, r'timeout must be a number \(seconds\), got bool True'),
        (dict(memory_mb=0.5), TypeError, r'memory_mb must be a whole number of MB, got float 0.5'),
        (dict(memory_mb=256.5), TypeError, r'memory_mb must be a whole number of MB, got float 256.5'),
        (dict(memory_mb=float('nan')), TypeError, r'memory_mb must be a whole number of MB, got float nan'),
        (dict(memory_mb=float('inf')), TypeError, r'memory_mb must be a whole number of MB, got float inf'),
        (dict(memory_mb=16), ValueError, r'memory_mb must be >= 32 \(the interpreter needs about 16 MB to start\)'),
        (dict(memory_mb=2**40), ValueError, r'memory_mb must be .*<= 1048576'),
        (dict(memory_mb=True), TypeError, r'memory_mb must be a whole number of MB, got bool True'),
        (dict(max_output_bytes=-1), ValueError, r'max_output_bytes must be an int >= 0 and <= 1073741824, got -1'),
        (dict(max_output_bytes=2**31), ValueError, r'max_output_bytes must be an int >= 0 and <= 1073741824'),
        (dict(max_output_bytes=100.0), TypeError, r'max_output_bytes must be an int, got float 100.0'),
        (dict(max_procs=-1), ValueError, r'max_procs must be an int >= 0 and <= 4096 \(extra threads'),
        (dict(max_procs=10**6), ValueError, r'max_procs must be an int >= 0 and <= 4096'),
        (dict(max_procs=1.0), TypeError, r'max_procs must be an int \(extra threads.*\), got float 1.0'),
        (dict(max_procs=False), TypeError, r'max_procs must be an int .*, got bool False'),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg): run_python("pass", **kw)
    # the accepted edges run normally (a whole float is a whole number of MB)
    assert run_python("print(1)", timeout=86400, memory_mb=32.0, max_output_bytes=2, max_procs=0).stdout == "1\n"
    r = run_python("print('x')", max_output_bytes=0)  # no output allowed: the code fails, nothing comes back
    assert not r.ok and r.stdout == r.stderr == ""


def test_bwrap_failing_is_a_sandbox_error_not_a_code_failure(monkeypatch):
    "bwrap's own error (here: a mount whose source is missing) raises SandboxError; the code never ran."
    assert sandbox_backend() == 'bwrap'
    monkeypatch.setitem(tasks._setup, 'mounts', tasks._setup['mounts'] + ['--ro-bind', '/nonexistent-qwen-edu', '/x'])
    with pytest.raises(tasks.SandboxError, match=r"the sandbox did not start .*bwrap: Can't find source path "
                                                 r"/nonexistent-qwen-edu"):
        run_python("print(1)")
    monkeypatch.undo()
    # the code failing the same way bwrap does (exit 1, a 'bwrap:' line on stderr) is still the code's result
    r = run_python("import sys\nsys.stderr.write('bwrap: fake\\n'); sys.exit(1)")
    assert r.returncode == 1 and r.stderr == 'bwrap: fake\n'


def test_max_procs_allows_threads_never_processes():
    "max_procs counts threads (RLIMIT_NPROC); fork/exec/subprocess stay refused by the audit hook whatever its value."
    threads = ("import threading\nts = [threading.Thread(target=int) for _ in range(2)]\n"
               "for t in ts: t.start()\nfor t in ts: t.join()\nprint('threads ok')")
    r = run_python(threads)
    assert not r.ok and "can't start new thread" in r.stderr
    assert run_python(threads, max_procs=2).stdout == "threads ok\n"
    r = run_python("import os\nos.fork()", max_procs=8)
    assert not r.ok and 'sandbox: os.fork is not allowed' in r.stderr
    with pytest.raises(ValueError, match=r'max_procs.*extra threads the code may start; fork, exec and subprocess '
                                         r'are refused whatever its value'):
        run_python("pass", max_procs=-1)


def test_parallel_calls():
    out = [None] * 6
    def go(i): out[i] = run_python(f"print({i} * {i})").stdout
    ts = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert out == [f"{i * i}\n" for i in range(6)]


def test_snapshots_of_killed_processes_are_removed(tmp_path):
    "A snapshot left by a process killed before its atexit ran is deleted; a live process's and a foreign name are kept."
    import subprocess, sys
    from qwen_edu.tasks import _remove_stale_snapshots
    p = subprocess.Popen([sys.executable, '-c', 'pass']); p.wait()  # a pid that no longer runs
    dead, live, other = tmp_path / f'qwen_edu_python_{p.pid}_x', tmp_path / f'qwen_edu_python_{os.getpid()}_y', tmp_path / 'qwen_edu_python_z'
    for d in (dead, live, other): (d / 'lib').mkdir(parents=True)
    assert _remove_stale_snapshots(tmp_path) == 1
    assert not dead.exists() and live.exists() and other.exists()
