"""Network namespaces for the silent deaths loopback cannot produce.

:class:`NetnsPair` joins two fresh namespaces with a veth pair and holds the
peer in a :class:`~fastlive.testing.PeerProcess` inside B; its faults
(:meth:`~NetnsPair.link_down`, :meth:`~NetnsPair.blackhole`,
:meth:`~NetnsPair.drop`) cut the peer so that nothing - no FIN, RST, ICMP or
ARP failure - reaches the local side and only a timer can tell.

Network rules: only the 10.77.x.y/24 addresses this module gives the veth
ends *inside* the namespaces it creates.  Every wait is bounded.  Needs root
(see :func:`netns_unavailable`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ._spawn import ip_command as _ip
from ._spawn import libc as _libc
from ._spawn import pid_alive as _pid_alive
from .peer import PeerProcess

__all__ = ["NetnsPair", "in_netns", "list_netns", "sweep_stale_netns",
           "netns_available", "netns_unavailable", "firewall_tool"]

_CLONE_NEWNET = 0x40000000


def _run(*args: str, check: bool = True, timeout: float = 10.0,
         stdin: Optional[str] = None) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                         input=stdin)
    if check and out.returncode != 0:
        what = " ".join(args) + (f" <<< {stdin!r}" if stdin else "")
        raise OSError(f"{what}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _netns_path(name: str) -> str:
    for base in ("/run/netns", "/var/run/netns"):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no network namespace named {name!r}")


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the *calling thread* inside network namespace
    ``name`` (setns(2)), then switch back.

    A socket belongs to the namespace it was created in, for its whole life:
    sockets created in the block stay in ``name`` after it, and work from
    any thread.  Threads started in the block inherit the namespace; other
    threads of the process are not affected.  Needs CAP_SYS_ADMIN.
    """
    target = os.open(_netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


NAME_RE = re.compile(r"fl-(\d+)-(\d+)-[ab]")
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def list_netns() -> List[str]:
    """Names of the named network namespaces: the files in ``/run/netns``,
    where ``ip netns add`` mounts them (what ``ip netns list`` reads)."""
    names: List[str] = []
    for base in ("/run/netns", "/var/run/netns"):
        try:
            names += [n for n in os.listdir(base) if n not in names]
        except OSError:
            continue
    return sorted(names)


def sweep_stale_netns() -> List[str]:
    """Delete namespaces named ``fl-<pid>-<n>-a|b`` whose creating process
    is gone (left by a killed test run), after killing the helper processes
    still inside them.  Returns the names deleted."""
    gone = []
    for name in list_netns():
        m = NAME_RE.fullmatch(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for pid in _run(_ip(), "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(_ip(), "netns", "del", name, check=False)
            gone.append(name)
    return gone


_probe_result: Optional[str] = None
_probe_lock = threading.Lock()


def netns_unavailable() -> Optional[str]:
    """Why :class:`NetnsPair` cannot run here, or None when it can.

    Needs root, the ``ip`` command and a kernel with network namespaces and
    veth; checked once by really creating (and deleting) a pair."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result or None


def netns_available() -> bool:
    """Whether NetnsPair can run here (see netns_unavailable for why not)."""
    return netns_unavailable() is None


def _probe() -> str:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    try:
        ip = _ip()
    except FileNotFoundError as exc:
        return str(exc)
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces (/proc/self/ns/net)"
    n = next(_counter)
    a, b = f"fl-{os.getpid()}-{n}-a", f"fl-{os.getpid()}-{n}-b"
    try:
        _run(ip, "netns", "add", a)
        _run(ip, "netns", "add", b)
        _run(ip, "link", "add", "p0", "netns", a, "type", "veth",
             "peer", "name", "p1", "netns", b)
        with in_netns(a):
            pass
        _run(ip, "netns", "exec", b, sys.executable, "-c", "pass", timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a netns/veth pair: {exc}"
    finally:
        for ns in (a, b):
            _run(ip, "netns", "del", ns, check=False)
    return ""


def firewall_tool() -> Optional[str]:
    """'nft' or 'iptables' when installed (for :meth:`NetnsPair.drop`)."""
    for tool in ("nft", "iptables"):
        if shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"):
            return tool
    return None


class NetnsPair:
    """Two fresh network namespaces, A (local) and B (peer), joined by a veth
    pair: ``veth-a`` 10.77.X.1/24 in A, ``veth-b`` 10.77.X.2/24 in B.

    On entry it starts a :class:`PeerProcess` listening in B (``peer``) and
    connects ``local`` to it from a socket this process creates inside A
    (:func:`in_netns`: a socket stays in the namespace it was created in, so
    ``local`` is used from here like any other socket).  :meth:`connect`
    makes more connections, each accepted by the same helper (its
    connection numbers follow the order of the calls).

    Silent deaths (nothing reaches A: no FIN, RST, ICMP or ARP failure):

    - :meth:`link_down`: B's end of the veth goes down (the peer's cable
      pulled); A's end loses carrier and drops what it sends.
    - :meth:`blackhole`: the peer's address disappears from B while A keeps
      a PERMANENT neighbour entry for it with B's MAC, so A keeps sending
      frames that B silently discards (B does not forward).
    - :meth:`drop`: a firewall rule in B drops A's packets (needs nft or
      iptables).
    - ``peer.freeze()``: the peer process stops but its kernel still
      answers - not a death at all to any kernel timer.

    On exit (also after an error) the local sockets are closed, the helper
    is killed and both namespaces are deleted.  Stale ``fl-<pid>-*``
    namespaces of dead processes are swept on entry.
    """

    def __init__(self, *, subnet: Optional[int] = None, timeout: float = 10.0) -> None:
        with _counter_lock:
            self.n = next(_counter)
        pid = os.getpid()
        self.ns_a = f"fl-{pid}-{self.n}-a"
        self.ns_b = f"fl-{pid}-{self.n}-b"
        x = subnet if subnet is not None else 1 + (self.n - 1) % 254
        if not 0 <= x <= 255:
            raise ValueError("subnet must be 0..255")
        self.addr_a = f"10.77.{x}.1"
        self.addr_b = f"10.77.{x}.2"
        self.dev_a = "veth-a"
        self.dev_b = "veth-b"
        self.timeout = timeout
        self.mac_a = ""
        self.mac_b = ""
        self.peer: Optional[PeerProcess] = None
        self.local: Optional[socket.socket] = None
        self.sockets: List[socket.socket] = []
        self._numbers: Dict[int, int] = {}
        self.faults: List[str] = []
        self._created: List[str] = []
        self._fw: Optional[str] = None

    @staticmethod
    def available() -> bool:
        """Whether a pair can be made here (root, ``ip``, netns, veth)."""
        return netns_available()

    @staticmethod
    def unavailable_reason() -> Optional[str]:
        """Why not, or None (see :func:`netns_unavailable`)."""
        return netns_unavailable()

    # -- set-up / tear-down -------------------------------------------------
    def __enter__(self) -> NetnsPair:
        reason = netns_unavailable()
        if reason:
            raise OSError(_errno.EPERM, reason)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ipn(self, ns: str, *args: str) -> str:
        return _run(_ip(), "-n", ns, *args, timeout=self.timeout)

    def _setup(self) -> None:
        ip = _ip()
        sweep_stale_netns()
        # (few processes: each ``ip`` costs a fork, an exec and its
        # libraries, ~0.1 s on an emulated CPU; one batch per namespace)
        for ns in (self.ns_a, self.ns_b):
            if ns in list_netns():                   # a leftover of a reused pid
                _run(ip, "netns", "del", ns, check=False)
            _run(ip, "netns", "add", ns)
            self._created.append(ns)
        _run(ip, "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth",
             "peer", "name", self.dev_b, "netns", self.ns_b)
        for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a),
                              (self.ns_b, self.dev_b, self.addr_b)):
            _run(ip, "-n", ns, "-batch", "-", timeout=self.timeout,
                 stdin=f"link set lo up\naddr add {addr}/24 dev {dev}\nlink set {dev} up\n")
        self.mac_a = str(self._wait_link("a", ("UP", "UNKNOWN"), None)["address"])
        self.mac_b = str(self._wait_link("b", ("UP", "UNKNOWN"), None)["address"])
        self.peer = PeerProcess(listen=(self.addr_b, 0), netns=self.ns_b,
                                timeout=self.timeout)
        self.local = self.connect()

    def close(self) -> None:
        """Close the local sockets, kill the helper, delete both namespaces.
        Safe to call twice; never raises for what is already gone."""
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        if self.peer is not None:
            self.peer.close()
        for ns in self._created:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run(_ip(), "netns", "del", ns, check=False)
        self._created.clear()

    # -- sockets -----------------------------------------------------------
    def new_socket(self, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside A (closed by :meth:`close`)."""
        with in_netns(self.ns_a):
            s = socket.socket(family, type)
        self.sockets.append(s)
        return s

    def connect(self, timeout: Optional[float] = None) -> socket.socket:
        """A new local socket in A connected to the helper in B; returns it
        once the helper has accepted it (blocking, no timeout).  The
        helper's number for it is :meth:`number` (``local`` is 0)."""
        assert self.peer is not None, "use NetnsPair as a context manager"
        before = self.peer.count()
        s = self.new_socket()
        t = self.timeout if timeout is None else timeout
        s.settimeout(t)
        s.connect((self.addr_b, self.peer.port))
        s.settimeout(None)
        self.peer.wait_conns(before + 1, t)
        self._numbers[s.fileno()] = before
        return s

    def number(self, sock: socket.socket) -> int:
        """The helper's connection number (``conn=``) for a socket made by
        :meth:`connect`."""
        return self._numbers[sock.fileno()]

    def inside_a(self) -> contextlib.AbstractContextManager[None]:
        """``with pair.inside_a(): ...`` - create your own sockets (e.g. a
        server under test, listening on ``addr_a``) in namespace A."""
        return in_netns(self.ns_a)

    # -- faults ------------------------------------------------------------
    def link_down(self) -> None:
        """Silent death 1: B's veth end goes down, A's end loses carrier.
        A's neighbour entry for the peer is pinned first, so no ARP failure
        (and its local "host unreachable") gives the death away."""
        self._pin_neighbour()
        self._ipn(self.ns_b, "link", "set", self.dev_b, "down")
        self.wait_link_state("b", "DOWN")
        self.wait_link_state("a", "LOWERLAYERDOWN", "DOWN")
        self.faults.append("link_down")

    def link_up(self) -> None:
        """Undo :meth:`link_down` (returns once both ends are up again)."""
        self._ipn(self.ns_b, "link", "set", self.dev_b, "up")
        for side in ("b", "a"):
            self.wait_link_state(side, "UP", "UNKNOWN")
        self.faults.append("link_up")

    def blackhole(self) -> None:
        """Silent death 2: delete the peer's address in B and pin a PERMANENT
        neighbour entry for it in A with B's MAC.  A keeps sending frames
        to B, which drops them (not its address, no forwarding, no ICMP);
        nothing ever comes back."""
        self._pin_neighbour()
        self._ipn(self.ns_b, "addr", "del", f"{self.addr_b}/24", "dev", self.dev_b)
        self.faults.append("blackhole")

    def drop(self) -> None:
        """Silent death 3: a firewall rule in B drops everything from A
        (nft, or iptables).  OSError when neither tool is installed."""
        tool = firewall_tool()
        if tool is None:
            raise OSError(_errno.ENOENT, "neither nft nor iptables is installed")
        self._pin_neighbour()
        exe = [_ip(), "netns", "exec", self.ns_b]
        if tool == "nft":
            rules = ("add table inet fastlive\n"
                     "add chain inet fastlive input { type filter hook input priority 0 ; }\n"
                     f"add rule inet fastlive input ip saddr {self.addr_a} drop\n")
            out = subprocess.run(exe + ["nft", "-f", "-"], input=rules, text=True,
                                 capture_output=True, timeout=self.timeout)
            if out.returncode != 0:
                raise OSError(f"nft: {out.stderr.strip()}")
        else:
            _run(*exe, "iptables", "-I", "INPUT", "-s", self.addr_a, "-j", "DROP",
                 timeout=self.timeout)
        self._fw = tool
        self.faults.append("drop")

    def _pin_neighbour(self) -> None:
        self._ipn(self.ns_a, "neigh", "replace", self.addr_b, "lladdr", self.mac_b,
                  "dev", self.dev_a, "nud", "permanent")

    def neighbour(self) -> str:
        """A's neighbour entry for the peer (``ip neigh show``), e.g.
        ``10.77.1.2 dev veth-a lladdr ... PERMANENT``."""
        return self._ipn(self.ns_a, "neigh", "show", self.addr_b).strip()

    def _link(self, side: str) -> Dict[str, Any]:
        ns, dev = (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)
        info: Dict[str, Any] = json.loads(self._ipn(ns, "-j", "link", "show", dev))[0]
        return info

    def link_state(self, side: str = "b") -> str:
        """operstate of a veth end ('UP', 'DOWN', 'LOWERLAYERDOWN')."""
        return str(self._link(side)["operstate"])

    def wait_link_state(self, side: str, *states: str, timeout: Optional[float] = None) -> str:
        """Wait until a veth end's operstate is one of ``states``; return it.

        ``ip link set up/down`` returns before the operstate changes: the
        kernel applies carrier and operstate changes from its linkwatch
        work, which may run up to a second later (Debian 12's Linux 6.1
        still shows DOWN 0.3 s after "up", UP at 0.6 s; 6.18 shows it at
        once).  Polls every 20 ms; TimeoutError naming the last state after
        ``timeout`` seconds (default: the pair's ``timeout``)."""
        if not states:
            raise ValueError("states: name at least one operstate")
        return str(self._wait_link(side, states, timeout)["operstate"])

    def _wait_link(self, side: str, states: Sequence[str],
                   timeout: Optional[float]) -> Dict[str, Any]:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            info = self._link(side)
            if info["operstate"] in states:
                return info
            if time.monotonic() >= deadline:
                raise TimeoutError(f"veth end {side!r} is {info['operstate']}, not "
                                   f"{'/'.join(states)}, after {limit:g} s")
            time.sleep(0.02)

    def addresses(self, side: str = "b") -> List[str]:
        """IPv4 addresses on a veth end."""
        ns, dev = (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)
        info = json.loads(self._ipn(ns, "-j", "-4", "addr", "show", "dev", dev))
        return [a["local"] for i in info for a in i.get("addr_info", [])]

    def __repr__(self) -> str:
        return (f"<NetnsPair {self.ns_a} {self.addr_a} <-> {self.ns_b} {self.addr_b}"
                f" faults={self.faults}>")

