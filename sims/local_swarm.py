"""A local swarm: a bootstrap DHT node and N real peer processes on 127.0.0.1.

    with LocalSwarm(model_path, num_peers=3) as swarm:
        client = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers)

Every child runs in its own session and is stopped (SIGTERM, then SIGKILL after a grace period) when the swarm
stops; each child also runs a reaper for its own children, so nothing is left behind. Local swarms contact
nothing beyond loopback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import psutil


def default_spans(num_blocks: int, num_peers: int, blocks_per_peer: Optional[int] = None) -> List[Tuple[int, int]]:
    """Spans for ``num_peers`` peers: ``blocks_per_peer`` blocks each (default ``ceil(num_blocks / 2)``, or all
    blocks for one peer), laid round-robin so consecutive peers tile the model and later ones add replicas.

    :raises ValueError: if ``num_peers`` or ``blocks_per_peer`` is below 1, ``blocks_per_peer`` is over
        ``num_blocks``, or the peers cannot cover every block
    """
    if num_peers < 1:
        raise ValueError(f"--peers must be at least 1, got {num_peers}")
    if blocks_per_peer is not None and not 1 <= blocks_per_peer <= num_blocks:
        raise ValueError(f"--blocks-per-peer must be between 1 and the model's {num_blocks} blocks, "
                         f"got {blocks_per_peer}")
    k = blocks_per_peer if blocks_per_peer is not None else (num_blocks if num_peers == 1 else math.ceil(num_blocks / 2))
    spans = []
    for i in range(num_peers):
        start = min((i * k) % num_blocks, num_blocks - k)
        spans.append((start, start + k))
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    if len(covered) < num_blocks:
        raise ValueError(f"{num_peers} peers of {k} blocks cannot cover all {num_blocks} blocks")
    return spans


class SwarmStartError(RuntimeError):
    """A process of the swarm exited or was not ready in time. ``str()`` is the reason plus the process's log
    tail; :meth:`one_line` is the reason plus the process's own last error line."""

    def __init__(self, child: "_Child", reason: str):
        self.reason, self.log_path = reason, child.log_path
        self.log_tail = child.tail()
        super().__init__(f"{reason}:\n{self.log_tail}")

    def one_line(self) -> str:
        lines = [line.strip() for line in self.log_tail.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        return f"{self.reason}" + (f": {said}" if said else "") + f" (log: {self.log_path})"


class _Child:
    def __init__(self, name: str, argv: List[str], log_path: str, env: Dict[str, str], ready_marker: str):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.ready = threading.Event()
        self.ready_line: Optional[str] = None
        self.log = open(log_path, "a", buffering=1)
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, text=True, bufsize=1,
        )
        self._marker = ready_marker
        self._log_lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        try:
            for line in self.proc.stdout:
                with self._log_lock:
                    if not self.log.closed:
                        self.log.write(line)
                if self._marker and line.startswith(self._marker) and not self.ready.is_set():
                    self.ready_line = line.strip()
                    self.ready.set()
        except (OSError, ValueError):  # the pipe or the log was closed under us: the child is being stopped
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def descendants(self) -> List[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout: float = 15.0, sig=signal.SIGTERM) -> Optional[int]:
        kids = self.descendants()
        if self.alive():
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for k in kids:  # p2pd or others the child failed to stop
            try:
                k.kill()
            except psutil.Error:
                pass
        self._thread.join(timeout=5)
        with self._log_lock:
            self.log.close()
        return self.proc.returncode


_REAPER = []


def _ensure_reaper(start_reaper) -> None:
    if not _REAPER:
        _REAPER.append(start_reaper())


class LocalSwarm:
    """Start a bootstrap node and peers; ``initial_peers`` is what clients pass to connect.

    :param model: checkpoint path or hub id
    :param num_peers: peers to start
    :param spans: explicit ``(start, end)`` per peer (default :func:`default_spans`)
    :param peer_args: extra ``swarm peer`` options for every peer (or a list of lists, one per peer)
    :param log_dir: where each process's log goes (default: a new temporary folder, removed at stop unless
        ``keep_logs``)
    :param host: the IP address the bootstrap node and the peers listen on (a peer's own ``--host-maddrs`` in
        ``peer_args`` wins)
    """

    def __init__(
        self,
        model: str,
        num_peers: int = 3,
        *,
        spans: Optional[Sequence[Tuple[int, int]]] = None,
        blocks_per_peer: Optional[int] = None,
        peer_args: Sequence = (),
        log_dir: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        ready_timeout: float = 120.0,
        num_threads: Optional[int] = 1,
        keep_logs: bool = False,
        host: str = "127.0.0.1",
    ):
        from protocols.model_spec import Checkpoint

        self.listen_maddr = listen_maddr(host)
        self.model = model
        self.num_blocks = Checkpoint(model).num_blocks
        self.spans = list(spans) if spans is not None else default_spans(self.num_blocks, num_peers, blocks_per_peer)
        self.peer_args = peer_args
        self._own_log_dir = log_dir is None and not keep_logs
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="swarm-sim-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.ready_timeout = ready_timeout
        self.num_threads = num_threads
        self.dht: Optional[_Child] = None
        self.peers: List[_Child] = []
        self.initial_peers: List[str] = []
        self.ready_seconds: Optional[float] = None

    def _swarm_cmd(self) -> List[str]:
        return [sys.executable, "-m", "swarm.cli"]

    def start(self) -> "LocalSwarm":
        """Start everything and wait until every peer serves its span.

        :raises RuntimeError: if a process dies or the swarm is not ready within ``ready_timeout`` seconds
        """
        from protocols.transport import start_reaper

        _ensure_reaper(start_reaper)  # if this process is SIGKILLed, its peers go with it
        t0 = time.perf_counter()
        try:
            self.dht = _Child("dht", self._swarm_cmd() + ["dht", "--host-maddrs", self.listen_maddr],
                              os.path.join(self.log_dir, "dht.log"), self.env, "DHT_READY")
            self._wait([self.dht], t0)
            self.initial_peers = self.dht.ready_line.split()[1:]
            for i in range(len(self.spans)):
                self.start_peer(i)
            self._wait(self.peers, t0)
        except SwarmStartError:
            self._own_log_dir = False  # the error names a log file: keep it
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - t0
        return self

    def peer_argv(self, i: int, extra: Optional[Sequence[str]] = None) -> List[str]:
        if extra is None:
            extra = self.peer_args
            if extra and isinstance(extra[0], (list, tuple)):
                extra = extra[i] if i < len(extra) else []
        span = self.spans[i]
        where = ["--num-blocks", str(span)] if isinstance(span, int) else ["--blocks", f"{span[0]}:{span[1]}"]
        argv = self._swarm_cmd() + ["peer", "--model", self.model, *where, "--initial-peers", *self.initial_peers,
                                    "--host-maddrs", self.listen_maddr]
        if self.num_threads:
            argv += ["--num-threads", str(self.num_threads)]
        return argv + list(extra)

    def start_peer(self, i: int, wait: bool = False, extra: Optional[Sequence[str]] = None) -> _Child:
        """(Re)start peer ``i`` (with ``extra`` options instead of ``peer_args``); with ``wait``, block until it
        serves."""
        child = _Child(f"peer{i}", self.peer_argv(i, extra), os.path.join(self.log_dir, f"peer{i}.log"), self.env,
                       "PEER_READY")
        if i < len(self.peers):
            self.peers[i] = child
        else:
            self.peers.append(child)
        if wait:
            self._wait([child], time.perf_counter())
        return child

    def add_peer(self, span: Tuple[int, int], wait: bool = True) -> _Child:
        """Start one more peer serving ``span``."""
        return self.add_peer_with_args(span, [], wait=wait)

    def add_peer_with_args(self, span, args: Sequence[str], wait: bool = True) -> _Child:
        """Start one more peer serving ``span`` (``(start, end)``, or an int: that many blocks placed by the
        peer itself) with extra ``swarm peer`` options."""
        self.spans.append(span if isinstance(span, int) else tuple(span))
        return self.start_peer(len(self.spans) - 1, wait=wait, extra=args)

    def _wait(self, children: List[_Child], t0: float) -> None:
        for c in children:
            while not c.ready.wait(0.1):
                if not c.alive():
                    raise SwarmStartError(c, f"{c.name} exited with code {c.proc.returncode}")
                if time.perf_counter() - t0 > self.ready_timeout:
                    raise SwarmStartError(c, f"{c.name} not ready after {self.ready_timeout:.0f}s")

    def peer_id(self, i: int) -> str:
        return self.peers[i].ready_line.split()[1]

    def kill_peer(self, i: int, sig=signal.SIGKILL) -> None:
        """Send ``sig`` to peer ``i``'s main process only (SIGKILL: a crash; its reaper cleans up children)."""
        self.peers[i].proc.send_signal(sig)

    def stop(self) -> None:
        """Stop every peer, then the bootstrap node; nothing is left running."""
        threads = [threading.Thread(target=p.stop) for p in self.peers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.dht is not None:
            self.dht.stop()
        if self._own_log_dir:
            import shutil

            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exit_text(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"code {code}"


def listen_maddr(host: str) -> str:
    """The listen multiaddr (any free TCP port) of IP address ``host``.

    :raises ValueError: if ``host`` is not an IPv4 or IPv6 address
    """
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host must be an IP address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None
    return f"/ip{ip.version}/{ip}/tcp/0"


def run_sim_up(model: str, num_peers: int, blocks_per_peer: Optional[int] = None, host: str = "127.0.0.1",
               extra_peer_args: Sequence[str] = (), log_dir: Optional[str] = None, keep_logs: bool = False) -> int:
    """``swarm sim up``: start a local swarm, print its address, run until Ctrl-C or SIGTERM.

    A process that exits meanwhile (a crash, or a peer stopped on purpose to watch the swarm recover) is reported
    in one line and the rest keep running; the simulation ends by itself only when every process has exited
    (exit code 1). Ctrl-C, SIGTERM or SIGHUP stop every process (exit code 0), also while the swarm is starting.

    The processes' logs go to ``log_dir`` (kept), or else to a temporary folder that is removed at exit unless
    ``keep_logs``.
    """
    swarm = LocalSwarm(model, num_peers, blocks_per_peer=blocks_per_peer, peer_args=list(extra_peer_args),
                       log_dir=log_dir, keep_logs=keep_logs, host=host)
    stop = threading.Event()

    def interrupt_start(*_):  # during start-up: stop waiting for the peers at once (only the first signal raises)
        if not stop.is_set():
            stop.set()
            raise KeyboardInterrupt

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        signal.signal(sig, interrupt_start)
    kept = "" if log_dir or keep_logs else ", removed at exit unless --keep-logs"
    print(f"starting a bootstrap node and {num_peers} peers on {host} (logs in {swarm.log_dir}{kept})", flush=True)
    try:
        try:
            swarm.start()
        except SwarmStartError as e:
            print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted during start-up", flush=True)
            return 0
        for sig in signals:
            signal.signal(sig, lambda *_: stop.set())
        print(f"swarm ready in {swarm.ready_seconds:.1f}s; spans: "
              + ", ".join(f"{s}:{e}" for s, e in swarm.spans), flush=True)
        print("initial peers: " + " ".join(swarm.initial_peers), flush=True)
        print(json.dumps({"initial_peers": swarm.initial_peers, "ready_seconds": swarm.ready_seconds}), flush=True)
        print("press Ctrl-C to stop", flush=True)
        reported = set()
        while not stop.wait(0.5):
            children = [("bootstrap node", swarm.dht)] + [(f"peer {i}", p) for i, p in enumerate(swarm.peers)]
            for name, child in children:
                if child is not None and child.name not in reported and not child.alive():
                    reported.add(child.name)
                    running = sum(p.alive() for p in swarm.peers)
                    rest = ("clients can no longer join through its address" if child is swarm.dht
                            else f"{running} of {len(swarm.peers)} peers keep running")
                    print(f"warning: {name} exited with {_exit_text(child.proc.returncode)}; {rest} "
                          f"(log: {child.log_path})", flush=True)
            if len(reported) == len(children):
                print("every process of the swarm has exited", flush=True)
                return 1
    finally:
        print("stopping the swarm", flush=True)
        swarm.stop()
        print("stopped", flush=True)
    return 0
