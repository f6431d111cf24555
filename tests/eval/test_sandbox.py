"""The sandbox: model-written code runs in a separate, limited process and cannot harm the parent."""
from __future__ import annotations

import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from decodekit.eval.sandbox import OUTPUT_TAIL, SandboxLimits, isolation, run_python

QUICK = SandboxLimits(timeout_s=20, cpu_s=10, memory_mb=512, file_size_mb=4)


def test_correct_solution_passes():
    result = run_python("def f(x):\n    return x * 2\n\nassert f(21) == 42\nprint('ok')\n", QUICK)
    assert result.passed and result.status == "passed" and result.stdout == "ok\n"


def test_wrong_solution_fails():
    result = run_python("def f(x):\n    return x + 2\n\nassert f(21) == 42, 'wrong'\n", QUICK)
    assert result.status == "failed" and result.returncode == 1 and "AssertionError: wrong" in result.detail()


def test_syntax_error_fails():
    assert run_python("def f(:\n", QUICK).status == "failed"


def test_infinite_loop_is_killed_by_the_timeout():
    t0 = time.perf_counter()
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.5, cpu_s=60))
    assert result.status == "timeout" and not result.passed and result.returncode == -9
    assert time.perf_counter() - t0 < 10


def test_cpu_limit_stops_a_busy_loop():
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=60, cpu_s=1))
    assert result.status == "failed" and result.detail() == "killed by SIGXCPU"
    assert result.seconds < 60


@pytest.mark.parametrize("bomb", [
    "x = bytearray(8 << 30)\n",  # one huge allocation
    "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",  # growth, a MiB at a time
])
def test_memory_bomb_is_stopped(bomb):
    result = run_python(bomb, SandboxLimits(timeout_s=30, memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_huge_file_is_stopped():
    code = ("import os\ntry:\n    with open('big.bin', 'wb') as f:\n        while True:\n"
            "            f.write(b'x' * 65536)\n            f.flush()\nexcept OSError as e:\n"
            "    print('stopped at', os.path.getsize('big.bin'), e.errno)\n    raise\n")
    result = run_python(code, SandboxLimits(timeout_s=30, file_size_mb=1))
    assert result.status == "failed" and "File too large" in result.stderr
    size = int(result.stdout.split()[2])
    assert size <= 1 << 20


def test_output_is_capped():
    result = run_python("print('y' * 10_000_000)\n", SandboxLimits(timeout_s=30, file_size_mb=1))
    assert len(result.stdout) <= OUTPUT_TAIL


def test_stdin_is_closed():
    result = run_python("input()\n", QUICK)
    assert result.status == "failed" and "EOFError" in result.stderr


@pytest.fixture
def outside(monkeypatch):
    """A folder the sandbox's own folders go into (so `../` from the program's cwd is this folder), holding a file
    the program must not change, made the parent's cwd. In the system temp folder: reachable by `nobody`."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        (base / "victim.txt").write_text("original")
        monkeypatch.chdir(base)
        yield base


ESCAPES = """
import os
open('victim.txt', 'w').write('inside')  # relative: the sandbox's own folder
assert open('victim.txt').read() == 'inside'
refused = 0
for attempt in (lambda: open('../victim.txt', 'w'), lambda: open(os.path.abspath('../victim.txt'), 'a'),
                lambda: os.open('../victim.txt', os.O_WRONLY | os.O_TRUNC), lambda: open('../new.txt', 'x'),
                lambda: os.remove('../victim.txt'), lambda: os.rename('victim.txt', '../victim.txt'),
                lambda: os.chdir('..')):
    try:
        attempt()
    except PermissionError:
        refused += 1
print(refused)
"""


def test_cannot_modify_files_outside_its_folder(outside):
    """cwd-relative and absolute writes land in the temporary folder or are refused; the parent's files stay."""
    result = run_python(ESCAPES, QUICK, base_dir=outside)
    assert result.passed, result.stderr
    assert result.stdout.strip() == "7"
    assert (outside / "victim.txt").read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]  # nothing new, sandbox folder removed


@pytest.fixture
def readable_interpreter(monkeypatch):
    """As root with an interpreter others can read (the system's), the sandbox runs programs as `nobody`."""
    system = Path("/usr/bin/python3")
    if os.geteuid() != 0 or not system.exists():
        pytest.skip("needs root and /usr/bin/python3")
    isolation.cache_clear()
    monkeypatch.setattr(sys, "executable", str(system))
    yield
    isolation.cache_clear()  # the next probe, after monkeypatch restores sys.executable, sees the real interpreter


def test_as_root_the_program_runs_as_nobody(readable_interpreter, outside):
    if isolation().run_as < 0:
        pytest.skip("the system interpreter cannot run as nobody here")
    assert run_python("import os\nassert os.getuid() == os.getgid() == 65534\n", QUICK).passed
    assert run_python(ESCAPES, QUICK, base_dir=outside).stdout.strip() == "7"
    # The OS now stops what the Python-level guard cannot: writes and forks through `posix` directly.
    bypass = "import posix\nposix.open('../victim.txt', posix.O_WRONLY | posix.O_TRUNC)\n"
    assert "Permission denied" in run_python(bypass, QUICK, base_dir=outside).stderr
    assert "Resource temporarily unavailable" in run_python("import posix\nposix.fork()\n", QUICK).stderr
    assert (outside / "victim.txt").read_text() == "original"


def test_processes_are_refused_and_the_group_is_killed():
    result = run_python("import subprocess\nsubprocess.run(['true'])\n", QUICK)
    assert result.status == "failed" and "subprocess.run is disabled" in result.stderr
    assert "os.fork is disabled" in run_python("import os\nos.fork()\n", QUICK).stderr
    # A deliberate fork through `posix` bypasses the guard (documented); where the OS allows it, the timeout still
    # kills the whole process group, the child's child included.
    code = "import posix, time\npid = posix.fork()\nprint(posix.getpid(), flush=True)\ntime.sleep(100)\n"
    result = run_python(code, SandboxLimits(timeout_s=3))
    assert result.status in ("timeout", "failed")
    for pid in map(int, result.stdout.split()):
        time.sleep(0.2)
        state = open(f"/proc/{pid}/status").read() if os.path.exists(f"/proc/{pid}/status") else "State: gone"
        assert "State:\tZ" in state or "gone" in state, state


def test_network_is_blocked_where_the_os_allows():
    if not isolation().network:
        pytest.skip("no network namespace on this machine: the sandbox documents that the network is not blocked")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
        result = run_python(code, QUICK)
    assert result.status == "failed" and "connected" not in result.stdout


def test_parent_is_unaffected(tmp_path):
    kinds = [resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC]
    before = ([resource.getrlimit(k) for k in kinds], os.getcwd(), dict(os.environ), os.getuid(), open, os.remove)
    code = ("import os, resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 1))\nos.environ['HACKED'] = '1'\n"
            "raise SystemExit(3)\n")
    assert run_python(code, QUICK).returncode == 3
    run_python("x = bytearray(8 << 30)\n", SandboxLimits(memory_mb=128))
    after = ([resource.getrlimit(k) for k in kinds], os.getcwd(), dict(os.environ), os.getuid(), open, os.remove)
    assert after == before
    scratch = tmp_path / "still-writable.txt"  # the parent's own file operations still work
    scratch.write_text("x")
    os.remove(scratch)


def test_bad_limits():
    with pytest.raises(ValueError, match="sandbox limits"):
        run_python("pass", SandboxLimits(timeout_s=0))
