"""The one way fastlive starts a helper process (owner side).

Every helper - a :class:`~fastlive.testing.PeerProcess`, the many-peers
holder, a heartbeat peer - runs :mod:`fastlive.testing._child` under the
interpreter that started it, importing the *same* fastlive package as the
owner: the package's parent directory goes first on the child's
``sys.path``, ahead of the current directory (where a source checkout's
``./fastlive`` without its compiled core would otherwise shadow the
installed one).  The child sets ``PR_SET_PDEATHSIG`` (SIGKILL) first thing,
so it dies with its owner; it also exits on end of file on its control
channel and after a maximum lifetime.
"""
from __future__ import annotations

import ctypes
import functools
import os
import queue
import shutil
import subprocess
import sys
import threading
from typing import IO, Any, Callable, List, Optional, Sequence, Tuple, Union

__all__ = ["spawn", "python_argv", "child_argv", "package_parent", "proc_state", "pid_alive", "ip_command"]

_File = Union[int, IO[Any], None]


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, for prctl(2) and setns(2)."""
    return ctypes.CDLL(None, use_errno=True)


def package_parent() -> str:
    """The directory that holds the ``fastlive`` package this process imported."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_argv(module: str, func: str = "main") -> List[str]:
    """``[python, -c, ...]`` that imports this process's fastlive (its parent
    directory first on ``sys.path``, ahead of the current directory) and
    runs ``sys.exit(module.func(sys.argv[1:]))``; append the arguments."""
    boot = (f"import sys; sys.path.insert(0, sys.argv.pop(1)); "
            f"from {module} import {func}; sys.exit({func}(sys.argv[1:]))")
    return [sys.executable, "-c", boot, package_parent()]


def child_argv() -> List[str]:
    """``[python, -c, ...]`` that runs :mod:`fastlive.testing._child`'s
    ``main`` from its file, without importing the fastlive package (the
    roles that need fastlive import it themselves, this process's copy:
    its parent directory goes first on ``sys.path``).  Importing the
    package costs ~130 ms natively and seconds on an emulated CPU, and a
    test suite starts hundreds of helpers."""
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
    boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "import importlib.util as u; s = u.spec_from_file_location('fastlive_child', sys.argv.pop(1)); "
            "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); "
            "sys.exit(m.main(sys.argv[1:]))")
    return [sys.executable, "-c", boot, package_parent(), child]


def ip_command() -> str:
    """The ``ip`` command (iproute2); FileNotFoundError when it is missing."""
    path = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise FileNotFoundError("the 'ip' command (iproute2) is not installed")
    return path


class _Spawner:
    """Starts helper processes from one thread that lives as long as the
    process (the main thread, or a daemon thread for calls from any other
    thread).  PR_SET_PDEATHSIG fires when the *thread* that forked a child
    exits, so a helper started straight from a short-lived worker thread
    would die with that thread instead of with the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def _loop(self) -> None:
        while True:
            fn, box = self._jobs.get()
            try:
                box.put((True, fn()))
            except BaseException as exc:  # handed back to the caller
                box.put((False, exc))

    def run(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                 name="fastlive-spawner")
                self._thread.start()
        box: queue.Queue[Any] = queue.Queue()
        self._jobs.put((fn, box))
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value


_spawner = _Spawner()


def spawn(role: str, args: Sequence[str] = (), *, pass_fds: Sequence[int] = (),
          netns: Optional[str] = None, stdin: _File = subprocess.DEVNULL,
          stdout: _File = None, text: bool = False) -> subprocess.Popen[Any]:
    """Start ``fastlive.testing._child --ppid PID ROLE ARGS...`` as a helper that dies
    with this process (see the module docstring).  ``netns`` runs it inside
    that network namespace (``ip netns exec`` execs, so the pid is the
    helper's)."""
    cmd = child_argv() + ["--ppid", str(os.getpid()), role, *args]
    if netns is not None:
        cmd = [ip_command(), "netns", "exec", netns, *cmd]
    proc: subprocess.Popen[Any] = _spawner.run(lambda: subprocess.Popen(
        cmd, pass_fds=tuple(pass_fds), stdin=stdin, stdout=stdout, text=text,
        bufsize=1 if text else -1))
    return proc


def proc_state(pid: int) -> Optional[str]:
    """The one-letter state of /proc/PID/stat (R, S, T, Z...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parens: the state follows the last ')'.
    return data[data.rfind(b")") + 2:][:1].decode() or None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (kill(pid, 0))."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
