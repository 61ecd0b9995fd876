"""Bringing up the network engine: a libp2p daemon (hivemind ``P2P``) and a Kademlia DHT node on it.

Both run in the caller's asyncio event loop; the only child process is hivemind's libp2p daemon (p2pd).
:func:`create_p2p` starts p2pd in its own session, so a signal to the caller's whole process group (Ctrl-C in a
terminal, ``kill -TERM -PGID``, ``timeout``) reaches only the caller, which then still has a working daemon to
leave the swarm through, and stops the daemon itself. :func:`start_reaper` starts a watchdog (also in its own
session) that kills such children if their parent dies without stopping them (SIGKILL), since a killed parent
cannot clean up after itself (hivemind leaves p2pd running in that case).
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import contextvars
import logging
import os
import subprocess
import sys
from typing import Optional, Sequence

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

logger = logging.getLogger(__name__)

# Never ask a gateway for port mappings, never use relays or the public IPFS DHT: a swarm reaches its peers
# directly. (hivemind's defaults would contact the local network's gateway.)
LOCAL_ONLY = dict(nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False, use_ipfs=False)


# Set while create_p2p starts a daemon: hivemind's P2P.create spawns p2pd with asyncio's create_subprocess_exec and
# has no option for the child's session, so a wrapper of that function adds start_new_session=True for p2pd alone.
_P2PD_OWN_SESSION: contextvars.ContextVar = contextvars.ContextVar("p2pd_own_session", default=False)


_SPAWNED_DAEMONS: list = []  # p2pd processes started by create_p2p in this process


def _install_p2pd_session_hook() -> None:
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_swarm_p2pd_hook", False):
        return

    async def create_subprocess_exec(program, *args, **kwargs):
        ours = _P2PD_OWN_SESSION.get() and os.path.basename(str(program)) == "p2pd"
        if ours:
            kwargs.setdefault("start_new_session", True)
        proc = await original(program, *args, **kwargs)
        if ours:
            _SPAWNED_DAEMONS.append(proc.pid)
        return proc

    create_subprocess_exec._swarm_p2pd_hook = True
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
    import atexit

    atexit.register(_stop_leftover_daemons)


def _stop_leftover_daemons() -> None:
    """At interpreter exit, stop any p2pd this process started and did not shut down (e.g. Ctrl-C while a client
    was still connecting): in its own session it no longer gets the terminal's signal. (A SIGKILLed process runs
    no exit handler; its reaper does this.)"""
    import signal

    import psutil

    for pid in _SPAWNED_DAEMONS:
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass


def daemon_alive(p2p: Optional[P2P]) -> bool:
    """Whether ``p2p``'s libp2p daemon process still runs (True for a daemon this process did not start)."""
    if p2p is None:
        return False
    child = getattr(p2p, "_child", None)
    if child is None:
        return True
    if child.returncode is not None:
        return False
    try:
        import psutil

        return psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # psutil.NoSuchProcess: gone and reaped
        return False


class PortInUseError(OSError):
    """The requested listen address is already taken by another process."""


def _port_of(maddr: str) -> Optional[int]:
    parts = str(maddr).split("/")
    for proto in ("tcp", "udp"):
        if proto in parts:
            try:
                return int(parts[parts.index(proto) + 1])
            except (ValueError, IndexError):
                return None
    return None


def check_ports_free(host_maddrs: Sequence[str]) -> None:
    """Bind-test every fixed TCP port in ``host_maddrs``.

    :raises PortInUseError: naming the first port that is already in use
    """
    import socket

    for maddr in host_maddrs:
        parts = str(maddr).split("/")
        port = _port_of(maddr)
        if not port or "tcp" not in parts:
            continue
        family = socket.AF_INET6 if "ip6" in parts else socket.AF_INET
        host = parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else "0.0.0.0"
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise PortInUseError(f"port {port} is already in use ({maddr}): {e.strerror}") from e


async def create_p2p(
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Optional[Sequence[str]] = None,
    initial_peers: Sequence[str] = (),
    identity_path: Optional[str] = None,
    client_mode: bool = False,
) -> P2P:
    """Start a libp2p daemon, in its own session (see the module's docstring).

    :param host_maddrs: multiaddrs to listen on (``/ip4/0.0.0.0/tcp/31337`` to accept outside connections)
    :param identity_path: an Ed25519 key in libp2p format (see :mod:`protocols.identity`); fixes the peer id
    :param client_mode: a client does not listen, it only dials
    :raises PortInUseError: if a fixed port in ``host_maddrs`` is taken
    """
    if not client_mode:
        check_ports_free(host_maddrs)
    _install_p2pd_session_hook()
    token = _P2PD_OWN_SESSION.set(True)
    try:
        return await P2P.create(
            initial_peers=list(initial_peers),
            host_maddrs=list(host_maddrs) if not client_mode else [],
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
            identity_path=identity_path,
            check_if_identity_free=False,
            dht_mode="client" if client_mode else "server",
            no_listen=client_mode,
            **LOCAL_ONLY,
        )
    except P2PDaemonError as e:
        text = str(e)
        if "address already in use" in text.lower():
            ports = ", ".join(str(_port_of(m)) for m in host_maddrs)
            raise PortInUseError(f"port {ports} is already in use: {text}") from e
        raise
    finally:
        _P2PD_OWN_SESSION.reset(token)


async def create_dht_node(p2p: P2P, initial_peers: Sequence[str] = (), client_mode: bool = False) -> DHTNode:
    """A Kademlia DHT node on ``p2p``'s transport, joined to the swarm through ``initial_peers``.

    :raises RuntimeError: if ``initial_peers`` are given but none of them answers
    """
    node = await DHTNode.create(
        p2p=p2p,
        initial_peers=list(initial_peers),
        client_mode=client_mode,
        num_workers=4,
        ensure_bootstrap_success=bool(initial_peers),
        wait_timeout=3,
    )
    return node


_REAPER_CODE = r"""
import os, signal, sys, time, psutil
parent = int(sys.argv[1]); seen = {}; me = os.getpid()

class ParentDied(Exception):
    pass

def on_parent_death(*_):
    raise ParentDied()

signal.signal(signal.SIGUSR1, on_parent_death)
try:  # Linux: be told at once when the parent dies, instead of noticing at the next poll
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))  # PR_SET_PDEATHSIG
except Exception:
    pass
try:
    while os.getppid() == parent:
        try:
            p = psutil.Process(parent)
            if p.status() == psutil.STATUS_ZOMBIE:
                break
            for c in p.children(recursive=True):
                if c.pid != me and c.pid not in seen:
                    try:
                        seen[c.pid] = c.create_time()
                    except psutil.Error:
                        pass
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
except ParentDied:
    pass
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
for pid, created in seen.items():
    try:
        c = psutil.Process(pid)
        if c.create_time() == created:
            c.kill()
    except psutil.Error:
        pass
"""


def start_reaper() -> subprocess.Popen:
    """Start a watchdog process that SIGKILLs this process's descendants once this process is gone.

    It runs in its own session, so a signal to this process's group (Ctrl-C, ``kill -TERM -PGID``) does not end it
    before this process has stopped its children (p2pd runs in a session of its own too, see :func:`create_p2p`).
    On Linux the kernel signals it the moment its parent dies (``PR_SET_PDEATHSIG``), so a SIGKILLed peer's
    libp2p daemon dies within milliseconds and its connections reset; elsewhere it notices within 0.5 s.
    It learns the descendants by polling twice a second, so children must live at least that long to be seen.
    """
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER_CODE, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
    )


async def ensure_connected(p2p: P2P, peer_id, addrs: Sequence[str]) -> None:
    """Tell the libp2p daemon where ``peer_id`` listens (from its DHT record) and connect to it.

    :raises ConnectionError: if the peer cannot be reached at any of ``addrs``
    """
    from hivemind.utils.multiaddr import Multiaddr

    maddrs = []
    for a in addrs:
        try:
            maddrs.append(Multiaddr(a.split("/p2p/")[0]))
        except Exception:
            continue
    try:
        await p2p._client.connect(peer_id, maddrs)
    except Exception as e:
        raise ConnectionError(f"cannot connect to peer {peer_id}: {e}") from e


def quiet_closed_streams(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` log, at debug level, the exceptions of hivemind's background stream writers that found their
    stream already closed by the other side (a peer that closed an idle session, a daemon that is gone), which
    asyncio would otherwise print with a traceback as "Task exception was never retrieved"; the stream's owner
    sees the failure itself. Anything else goes to the default handler."""
    def handler(loop, context):
        exc = context.get("exception")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
            logger.debug("%s: %s: %s", context.get("message"), type(exc).__name__, exc)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def ping(p2p: P2P, peer_id, payload: bytes = b"", timeout: float = 2.0) -> float:
    """One round trip of ``payload`` to a peer's ``swarm.ping`` RPC; returns its duration in seconds.

    :raises asyncio.TimeoutError: if no answer comes within ``timeout`` seconds
    :raises Exception: whatever the transport raises for an unreachable peer
    """
    import asyncio
    import time

    from hivemind.proto import runtime_pb2

    from protocols.messages import RPC_PING

    t0 = time.perf_counter()
    await asyncio.wait_for(p2p.call_protobuf_handler(
        peer_id, RPC_PING, runtime_pb2.ExpertRequest(uid="ping", metadata=payload), runtime_pb2.ExpertResponse
    ), timeout)
    return time.perf_counter() - t0


async def measure_link(p2p: P2P, peer_id, *, bandwidth_bytes: int = 256 * 1024, timeout: float = 2.0):
    """Round-trip time (s, best of 3 empty pings) and upload bandwidth (bytes/s, one ``bandwidth_bytes``
    ping) to a peer, through its ``swarm.ping`` RPC.

    :raises ConnectionError: if the peer does not answer within ``timeout`` seconds
    """
    try:
        rtt = min([await ping(p2p, peer_id, timeout=timeout) for _ in range(3)])
        big = await ping(p2p, peer_id, bytes(bandwidth_bytes), timeout=timeout)
    except Exception as e:
        raise ConnectionError(f"peer {peer_id} did not answer a ping: {e}") from e
    bandwidth = bandwidth_bytes / max(big - rtt, 1e-6)
    return rtt, bandwidth
