"""fastlive top: the analysis on real sockets, the plain-text output, and the
live view in a real terminal (tmux: send-keys, capture-pane).

Loopback (and, for retransmissions, a namespace pair the test creates).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import Iterator, List, Tuple

import pytest

import fastlive
from fastlive import TcpState
from fastlive.tools import top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastlive.__file__)))
Pairs = Tuple[socket.socket, List[Tuple[socket.socket, socket.socket]]]


def _close_wait(n: int, hold: int = 0) -> Pairs:
    """n loopback pairs; the client end of the first ``n - hold`` closes, so
    the server end (kept open here) sits in CLOSE_WAIT."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(256)
    pairs = []
    for _ in range(n):
        c = socket.create_connection(lst.getsockname(), timeout=5)
        s, _ = lst.accept()
        pairs.append((c, s))
    for c, _s in pairs[:n - hold]:
        c.close()
    return lst, pairs


@pytest.fixture
def close_wait() -> Iterator[Pairs]:
    lst, pairs = _close_wait(7, hold=2)
    port = lst.getsockname()[1]
    deadline = time.monotonic() + 5
    while len(fastlive.census(port=port, states="close-wait")) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    yield lst, pairs
    lst.close()
    for c, s in pairs:
        c.close()
        s.close()


def _env() -> dict:   # type: ignore[type-arg]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_analyze_groups_close_wait_by_process_and_port(close_wait: Pairs) -> None:
    lst, _pairs = close_wait
    port = lst.getsockname()[1]
    snap = top.analyze(fastlive.census(port=port))
    assert snap.counts[TcpState.CLOSE_WAIT] == 5
    assert snap.counts[TcpState.ESTABLISHED] == 4
    cw = [s for s in snap.suspects if "close-wait" in s.why]
    assert len(cw) == 5 and all(s.entry.state is TcpState.CLOSE_WAIT for s in cw)
    me = f"{os.getpid()}/"
    assert [(p.split("/")[0] + "/", n) for (p, lp), n in snap.close_wait.items() if lp == port] == [(me, 5)]
    # grouped by remote peer: one peer (127.0.0.1); 4 ESTABLISHED, 5 CLOSE_WAIT,
    # 5 FIN_WAIT2 (the closed client ends); 5 suspect
    n, why = snap.peers["127.0.0.1"]
    assert n == 14 and why["close-wait"] == 5
    h = top.History()
    h.add(snap)
    text = top.render_plain(h)
    assert "CLOSE_WAIT 5" in text and f"{os.getpid()}/" in text and str(port) in text


def test_sparkline_and_history_deltas(close_wait: Pairs) -> None:
    assert top.sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert top.sparkline([0, 0]) == "▁▁"
    lst, pairs = close_wait
    port = lst.getsockname()[1]
    h = top.History()
    h.add(top.analyze(fastlive.census(port=port)))
    pairs[5][0].close()                        # one more CLOSE_WAIT
    deadline = time.monotonic() + 5
    while len(fastlive.census(port=port, states="close-wait")) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    h.add(top.analyze(fastlive.census(port=port)))
    assert h.delta(TcpState.CLOSE_WAIT) == 1
    assert list(h.peer["127.0.0.1"]) == [5, 6]
    assert "CLOSE_WAIT 6 (+1)" in top.render_plain(h)


@pytest.mark.slow
def test_analyze_sees_retransmissions_in_a_namespace(netns_pair) -> None:  # type: ignore[no-untyped-def]
    from fastlive.testing.netns import in_netns
    pair = netns_pair
    pair.blackhole()
    pair.local.send(b"x" * 1000)
    deadline = time.monotonic() + 10
    found = []
    while time.monotonic() < deadline:
        with in_netns(pair.ns_a):               # the dump sees namespace A
            c = fastlive.census()
        snap = top.analyze(c)
        found = [s for s in snap.suspects if "retransmitting" in s.why]
        if found:
            break
        time.sleep(0.1)
    assert found and found[0].peer == pair.addr_b
    assert found[0].entry.info is not None and found[0].entry.info.unacked >= 1   # type: ignore[attr-defined]
    h = top.History()
    h.add(snap)
    assert "retransmitting 1" in top.render_plain(h)


def test_once_prints_plain_text(close_wait: Pairs) -> None:
    port = close_wait[0].getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "fastlive", "top", "--once", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    assert "CLOSE_WAIT 5" in out.stdout and "ESTABLISHED 4" in out.stdout
    assert "suspect: 5: close-wait 5" in out.stdout
    assert "\x1b[" not in out.stdout                   # no escape codes into a pipe


def test_not_a_terminal_refreshes_as_plain_text(close_wait: Pairs) -> None:
    port = close_wait[0].getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "fastlive", "top", "--interval", "0.2",
                          "--duration", "0.7", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("fastlive top") >= 3
    assert "\x1b[" not in out.stdout


def test_census_command_table_and_json(close_wait: Pairs, capsys: pytest.CaptureFixture[str]) -> None:
    """The table as ``python -m fastlive census``; --json and a bad --state
    through the command's main() in this process (a Python start-up costs
    ~6 s on an emulated CPU)."""
    import json
    from fastlive.tools.cli import main
    port = close_wait[0].getsockname()[1]
    args = ["census", "--port", str(port)]
    out = subprocess.run([sys.executable, "-m", "fastlive", *args, "--state", "close-wait"],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("STATE") and lines[-1] == "5 sockets: CLOSE_WAIT 5"
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 15 and sum(r["state"] == "CLOSE_WAIT" for r in rows) == 5
    assert sum(r["state"] == "FIN_WAIT2" for r in rows) == 5
    assert main([*args[:-2], "--state", "bogus"]) == 2
    assert "states" in capsys.readouterr().err


def _wait_subscribed(pid: int, timeout: float) -> None:
    """Until process ``pid`` holds a sock_diag netlink socket (protocol 4)
    joined to a multicast group (/proc/net/netlink: Eth, Pid, Groups), or
    ``timeout`` s: its start takes seconds on an emulated CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/netlink") as f:
            rows = [ln.split() for ln in f.readlines()[1:]]
        if any(r[1] == "4" and r[2] == str(pid) and int(r[3], 16) for r in rows if len(r) > 3):
            time.sleep(0.1)
            return
        time.sleep(0.05)


def test_census_follow_command_prints_deaths() -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fastlive", "census", "--follow", "--port", str(port),
                             "--duration", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        _wait_subscribed(proc.pid, 60.0)      # let it subscribe
        c = socket.create_connection(lst.getsockname(), timeout=5)
        s, _ = lst.accept()
        c.sendall(b"z" * 3000)
        s.recv(10000)
        c.close()
        s.close()
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
    finally:
        proc.kill()
        proc.wait(10)
        lst.close()
    assert all(f":{port}" in ln and "CLOSE" in ln for ln in lines), lines
    # bytes_acked counts the SYN (and the FIN once acknowledged)
    assert any(re.search(r"sent=300[12] ", ln) for ln in lines), lines
    assert any("recv=3001 " in ln for ln in lines), lines


# --- a real terminal ------------------------------------------------------------

tmux_missing = shutil.which("tmux") is None


class Tmux:
    def __init__(self) -> None:
        self.sock = f"fl-top-{os.getpid()}"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout

    def start(self, cmd: str) -> None:
        self.run("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "180", "-y", "50", cmd)
        self.run("set-option", "-t", "t", "remain-on-exit", "on")

    def screen(self, history: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-S", "-"] if history else []), "-t", "t")

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never showed; screen:\n{screen}")

    def dead(self) -> bool:
        return self.run("list-panes", "-t", "t", "-F", "#{pane_dead}").strip() == "1"

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=20)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if tmux_missing:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    t = Tmux()
    yield t
    t.kill()


def _cmd(*argv: str, block_rich: bool = False) -> str:
    pre = "import sys; sys.modules['rich'] = None; " if block_rich else "import sys; "
    code = pre + "from fastlive.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    return (f"env PYTHONPATH={shlex.quote(ROOT)} TERM=xterm-256color {shlex.quote(sys.executable)} "
            f"-c {shlex.quote(code)} " + " ".join(shlex.quote(a) for a in argv))


def test_live_view_in_a_real_terminal(tmux: Tmux, close_wait: Pairs) -> None:
    pytest.importorskip("rich")
    lst, pairs = close_wait
    port = lst.getsockname()[1]
    tmux.start(_cmd("top", "--interval", "0.3", "--port", str(port)))
    screen = tmux.wait_for("CLOSE_WAIT by process/port")
    assert "suspect peers" in screen and "127.0.0.1" in screen
    assert f"{os.getpid()}/" in screen and str(port) in screen
    assert "suspect connections" in screen
    # a new CLOSE_WAIT shows as a delta and in the trend
    pairs[5][0].close()
    screen = tmux.wait_for("+1")
    rows = [ln for ln in screen.splitlines() if "CLOSE_WAIT" in ln and "+1" in ln]
    assert rows and " 6 " in rows[0] + " ", screen
    # Ctrl-C ends it cleanly, the terminal is left as it was
    tmux.run("send-keys", "-t", "t", "C-c")
    deadline = time.monotonic() + 10
    while not tmux.dead() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tmux.dead()
    assert "Traceback" not in tmux.screen()


def test_terminal_without_rich_prints_plain_text(tmux: Tmux, close_wait: Pairs) -> None:
    port = close_wait[0].getsockname()[1]
    tmux.start(_cmd("top", "--interval", "0.3", "--duration", "1", "--port", str(port),
                    block_rich=True))
    screen = tmux.wait_for("CLOSE_WAIT 5")
    deadline = time.monotonic() + 10
    while not tmux.dead() and time.monotonic() < deadline:
        time.sleep(0.1)
    screen = tmux.screen(history=True)
    assert "needs rich" in screen and "fastlive[top]" in screen
    assert screen.count("fastlive top") >= 2 and "Traceback" not in screen
