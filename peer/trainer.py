"""The training peer: DiLoCo on a shard of a text corpus, elastic, checkpointed every outer step.

A :class:`TrainingPeer` holds a full replica of a small causal LM (a Hugging Face checkpoint, e.g. one written
by ``swarm.default_model.build_model``). It runs H *inner steps* of AdamW on its own shard of the corpus, then
an *outer step* (:class:`protocols.diloco.DiLoCoSync`): the pseudo-gradients of all peers present by the
deadline are averaged with a group all-reduce and applied with Nesterov momentum (Douillard et al. 2023,
"DiLoCo", Algorithm 1). Around that loop:

- **join**: a peer that finds live peers of the same run in the DHT downloads their anchor and outer-optimizer
  state, runs only the inner steps left in the current round and joins the next outer step with a weight of
  (inner steps done / H);
- **leave / die**: the others' outer step waits for a peer only as long as its last progress record predicts
  it needs (plus slack), then proceeds with whoever is present; a peer that missed an outer step (or ended up
  in a smaller group) notices it from the progress records and downloads the state of the main group;
- **checkpoint**: after every outer step, parameters, anchor, outer momentum, AdamW state, data position and
  history go to ``run_dir/checkpoint.pt`` (written atomically); a restarted peer resumes from it (and takes a
  newer state from live peers if the swarm has moved on);
- **output**: one log line per ``log_every`` inner steps (step, loss, tokens/s, bytes sent), one per outer step,
  ``run_dir/metrics.jsonl``, ``run_dir/loss.png`` and the final model in Hugging Face format in
  ``run_dir/model`` (servable with ``swarm peer --model run_dir/model``).

The corpus is ``data/kjv.txt.gz`` by default (the King James Bible, public domain; see ``data/README.md``),
tokenized with the model's own tokenizer. Every 50th line is held out for validation.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger("trainer")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_CORPUS = DATA_DIR / "kjv.txt.gz"
VAL_EVERY_LINE = 50  # every 50th line of the corpus is validation text


# --------------------------------------------------------------------------------------------- data
def read_corpus_lines(path: os.PathLike) -> List[str]:
    """The corpus's lines (a ``.txt`` or ``.txt.gz`` file, UTF-8), without empty ones."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def tokenize_corpus(tokenizer, path: os.PathLike = DEFAULT_CORPUS, cache_dir: Optional[os.PathLike] = None,
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Tokenize the corpus with ``tokenizer`` into (train, validation) token streams.

    Lines are joined with newlines; every :data:`VAL_EVERY_LINE`-th line goes to validation. The result is
    cached in ``cache_dir`` (keyed by the corpus and the tokenizer's vocabulary).

    :returns: two int32 arrays of token ids, shape ``[n_train]`` and ``[n_val]``
    """
    vocab_digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{vocab_digest}".encode())
    cache = Path(cache_dir) / f"tokens-{key.hexdigest()[:16]}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            return z["train"], z["val"]
    lines = read_corpus_lines(path)
    train_text = "\n".join(line for i, line in enumerate(lines) if i % VAL_EVERY_LINE != 0)
    val_text = "\n".join(line for i, line in enumerate(lines) if i % VAL_EVERY_LINE == 0)

    def encode(text: str) -> np.ndarray:
        # encode in pieces of whole lines: fast tokenizers are quick on many short strings
        pieces, out, step = text.split("\n"), [], 2000
        for i in range(0, len(pieces), step):
            chunk = "\n".join(pieces[i:i + step]) + ("\n" if i + step < len(pieces) else "")
            out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return np.asarray(out, dtype=np.int32)

    train, val = encode(train_text), encode(val_text)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, train=train, val=val)
        os.replace(tmp, cache)
    return train, val


class ShardSampler:
    """Deterministic batches from one shard of a token stream.

    The stream is cut into blocks of ``seq_len + 1`` tokens, the blocks are shuffled once with ``seed`` and dealt
    round-robin to ``num_shards`` shards. Batch ``k`` of shard ``i`` is blocks ``k*B .. k*B+B-1`` of that shard
    (reshuffled with ``seed + pass`` on each pass over it), so a data position is just the batch counter.

    :param tokens: int token ids, shape ``[n]``
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, shard: int, num_shards: int,
                 seed: int = 0):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
        n_blocks = len(tokens) // (seq_len + 1)
        blocks = torch.from_numpy(np.asarray(tokens[: n_blocks * (seq_len + 1)], dtype=np.int64))
        blocks = blocks.view(n_blocks, seq_len + 1)
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
        self.blocks = blocks[order[shard::num_shards]]
        self.batch_size, self.seed = batch_size, seed
        if len(self.blocks) < batch_size:
            raise ValueError(f"shard {shard}/{num_shards} has {len(self.blocks)} blocks, fewer than one batch")
        self.batches_per_pass = len(self.blocks) // batch_size
        self._pass, self._order = 0, torch.arange(len(self.blocks))

    def batch(self, k: int) -> torch.Tensor:
        """Batch number ``k`` (``k >= 0``): int64 token ids, shape ``[batch_size, seq_len + 1]``."""
        p, j = divmod(k, self.batches_per_pass)
        if p != self._pass:
            self._pass = p
            self._order = (torch.arange(len(self.blocks)) if p == 0 else
                           torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + p)))
        return self.blocks[self._order[j * self.batch_size:(j + 1) * self.batch_size]]


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of ``model`` on ``batch`` (``[B, T+1]`` token ids)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_tokens: np.ndarray, *, seq_len: int, num_sequences: int,
             batch_size: int = 16) -> float:
    """Validation loss (nats per token) on the first ``num_sequences`` blocks of ``seq_len + 1`` tokens."""
    n = min(num_sequences, len(val_tokens) // (seq_len + 1))
    blocks = torch.from_numpy(np.asarray(val_tokens[: n * (seq_len + 1)], dtype=np.int64)).view(n, seq_len + 1)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        batch = blocks[i:i + batch_size]
        total += float(lm_loss(model, batch)) * len(batch)
    model.train(was_training)
    return total / n


def inner_lr(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Inner learning rate at global inner step ``step``: linear warm-up over ``warmup`` steps, then cosine decay
    to ``floor * peak`` at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_inner_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------------------------- the peer
@dataclass
class TrainConfig:
    """Settings of one training peer (the ``swarm train`` options).

    :param model: a Hugging Face checkpoint directory to start from (every peer of a run uses the same one)
    :param run_dir: where this peer writes its checkpoint, metrics, plot and final model
    :param inner_steps: H, inner AdamW steps between outer steps
    :param outer_steps: the run ends after this many outer steps
    :param batch_size, seq_len: sequences per inner step and tokens per sequence
    :param lr, warmup, weight_decay, grad_clip: inner AdamW settings; ``lr`` is the peak of a warm-up + cosine
      schedule over ``inner_steps * outer_steps`` steps
    :param shard, num_shards: which part of the corpus this peer trains on
    :param data_offset: batches of the shard to skip (a peer that takes over a dead peer's shard)
    :param compression: ``none``, ``fp16`` or ``8bit``
    :param eval_sequences: validation sequences scored after every outer step (0: none)
    :param resume: resume from ``run_dir/checkpoint.pt`` if it exists
    :param stop_after: stop after this many outer steps in this session (for tests of resuming)
    """

    model: str
    run_dir: str
    run_id: str = "diloco"
    initial_peers: List[str] = field(default_factory=list)
    host_maddrs: List[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    corpus: str = str(DEFAULT_CORPUS)
    inner_steps: int = 50
    outer_steps: int = 10
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    shard: int = 0
    num_shards: int = 1
    data_offset: int = 0
    seed: int = 0
    compression: str = "fp16"
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    min_wait: float = 4.0
    max_wait: float = 90.0
    eval_sequences: int = 32
    log_every: int = 10
    num_threads: int = 1
    resume: bool = True
    save_model: bool = True
    stop_after: Optional[int] = None
    progress_period: float = 2.0


class RunMismatchError(RuntimeError):
    """The run this peer was asked to join trains another model."""


class TrainingPeer:
    """One DiLoCo training peer (see the module docstring). Call :meth:`run`; :meth:`stop` asks it to leave.

    :raises ValueError: ``seq_len`` over the model's ``max_position_embeddings``, a shard with less than one batch
    :raises OSError: a model or corpus that cannot be read
    """

    def __init__(self, cfg: TrainConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(max(1, cfg.num_threads))
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        from protocols.diloco import model_fingerprint

        self.model_id = model_fingerprint([(n, p.shape) for n, p in self.model.named_parameters()])
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.seq_len > limit:
            raise ValueError(f"--seq-len {cfg.seq_len} is over the model's limit of {limit} tokens "
                             "(max_position_embeddings)")
        self.model.train()
        cache_dir = Path(os.environ.get("SWARM_HOME") or Path.home() / ".cache" / "llm-swarm") / "tokens"
        self.train_tokens, self.val_tokens = tokenize_corpus(self.tokenizer, cfg.corpus, cache_dir)
        self.sampler = ShardSampler(self.train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                    shard=cfg.shard, num_shards=cfg.num_shards, seed=cfg.seed)
        self.optimizer = make_inner_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.batches_used = cfg.data_offset
        self.inner_step = 0  # inner steps since the last outer step (aligned with the swarm's round)
        self.history: Dict[str, List[Dict[str, Any]]] = {"inner": [], "outer": []}
        self.bytes_sent_total = 0
        self.tokens_total = 0
        self._stop = threading.Event()
        self._rate = 0.0
        self._dht_lock = threading.Lock()
        self.dht = None
        self.sync = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.on_ready = None  # called with this peer's multiaddrs once its DHT is up
        self._caught_up_at = -1  # the outer step at which we last downloaded the swarm's state

    # ---------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Ask the peer to leave after the current inner step (it tells the swarm it left)."""
        self._stop.set()

    def _start_network(self) -> None:
        from hivemind import DHT

        from protocols.diloco import DiLoCoConfig, DiLoCoSync
        from protocols.transport import LOCAL_ONLY

        cfg = self.cfg
        self.dht = DHT(initial_peers=cfg.initial_peers, host_maddrs=cfg.host_maddrs, start=True,
                       **LOCAL_ONLY)
        sync_cfg = DiLoCoConfig(outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum,
                                compression=cfg.compression, min_wait=cfg.min_wait, max_wait=cfg.max_wait)
        self.sync = DiLoCoSync(list(self.model.parameters()), self.dht, run_id=cfg.run_id, config=sync_cfg)
        if getattr(self, "_stop_signals", False):  # starting the averager process leaves SIGINT ignored here
            install_signal_handlers(self)
        self.peer_name = self.dht.peer_id.to_base58()[-6:]
        self.visible_maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        logger.info("peer %s up, run %r, shard %d/%d; DHT at %s", self.peer_name, cfg.run_id, cfg.shard,
                    cfg.num_shards, " ".join(self.visible_maddrs))
        if self.on_ready is not None:
            self.on_ready(self.visible_maddrs)

    def _shutdown_network(self) -> None:
        if self.sync is not None:
            self.sync.shutdown()
        if self.dht is not None:
            with contextlib.suppress(Exception):
                self.dht.shutdown()
        stop_children()

    # ---------------------------------------------------------------- progress records
    def _record(self, left: bool = False):
        from protocols.diloco import ProgressRecord

        return ProgressRecord(outer_step=self.sync.outer_step_count, inner_step=self.inner_step,
                              steps_per_s=0.0 if left else self._rate, group_score=self.sync.group_score,
                              target_inner_steps=0 if left else self.cfg.inner_steps, left=left,
                              model=self.model_id)

    def _publish(self, left: bool = False) -> None:
        from protocols.diloco import publish_progress

        with self._dht_lock:
            publish_progress(self.dht, self.cfg.run_id, self._record(left), ttl=self.sync.config.progress_ttl)

    def _fetch(self, check_model: bool = False):
        """The live records of the run's peers that train this peer's model, by peer id bytes.

        :raises RunMismatchError: with ``check_model``, if a live peer of the run trains another model (other
            parameter names or shapes): their pseudo-gradients cannot be averaged, and its state cannot be
            downloaded
        """
        from protocols.diloco import fetch_progress

        with self._dht_lock:
            progress = {k: v for k, v in fetch_progress(self.dht, self.cfg.run_id).items() if not v.left}
        others = {r.model for r in progress.values() if r.model not in ("", self.model_id)}
        if check_model and others:
            raise RunMismatchError(
                f"run {self.cfg.run_id!r} trains another model (fingerprint {', '.join(sorted(others))}; "
                f"{self.cfg.model} is {self.model_id}): pass the --model its peers use, or another --run-id")
        return {k: v for k, v in progress.items() if v.model not in others}

    def _publisher(self) -> None:
        while not self._stop.wait(self.cfg.progress_period):
            with contextlib.suppress(Exception):
                self._publish()

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Write params, outer state (anchor, momentum, step), AdamW state, data position and history, atomically."""
        state = dict(
            model={k: v.detach().clone() for k, v in self.model.state_dict().items()},
            sync=self.sync.state_dict(), inner_optimizer=self.optimizer.state_dict(),
            batches_used=self.batches_used, history=self.history, bytes_sent_total=self.bytes_sent_total,
            tokens_total=self.tokens_total, config=asdict(self.cfg), torch_rng=torch.get_rng_state(),
        )
        tmp = self._checkpoint_path().with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self._checkpoint_path())

    def load_checkpoint(self) -> bool:
        """Resume from ``run_dir/checkpoint.pt``; False if there is none."""
        path = self._checkpoint_path()
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.sync.load_state_dict(state["sync"])
        self.optimizer.load_state_dict(state["inner_optimizer"])
        self.batches_used = int(state["batches_used"])
        self.history = state["history"]
        self.bytes_sent_total = int(state.get("bytes_sent_total", 0))
        self.tokens_total = int(state.get("tokens_total", 0))
        torch.set_rng_state(state["torch_rng"])
        self.inner_step = 0
        logger.info("peer %s resumed from %s at outer step %d", self.peer_name, path, self.sync.outer_step_count)
        return True

    # ---------------------------------------------------------------- joining
    def _steps_left_in_round(self, progress) -> int:
        """Inner steps until the live peers at our outer step reach H (estimated from their records)."""
        from hivemind.utils import get_dht_time

        H, now, done = self.cfg.inner_steps, get_dht_time(), 0
        for record in progress.values():
            if record.outer_step != self.sync.outer_step_count:
                continue
            est = record.inner_step + max(0.0, now - record.time) * record.steps_per_s
            done = max(done, min(H, int(est)))
        return max(1, H - done)

    def _adopt_swarm_state(self, reason: str) -> bool:
        """Download the main group's state; align ``inner_step`` with its round (none once the downloaded state
        has the run's last outer step). False if none was served."""
        t0 = time.perf_counter()
        got = None
        while got is None and time.perf_counter() - t0 < 30:  # libp2p backs off a failed dial for a few seconds
            got = self.sync.download_state(timeout=60)
            if got is None:
                time.sleep(2.0)
        if got is None:
            logger.warning("peer %s: could not download the swarm's state (%s)", self.peer_name, reason)
            return False
        self.optimizer = make_inner_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        self._fresh_inner_optimizer_steps = 0
        final = self.sync.outer_step_count >= self.cfg.outer_steps
        left = 0 if final else self._steps_left_in_round(self._fetch())
        self.inner_step = 0 if final else self.cfg.inner_steps - left
        self._caught_up_at = self.sync.outer_step_count
        with contextlib.suppress(Exception):
            self._publish()
        self._log_event(dict(kind="join", reason=reason, outer_step=self.sync.outer_step_count,
                             bytes_received=int(got["bytes"]), seconds=time.perf_counter() - t0,
                             inner_steps_this_round=left))
        logger.info("peer %s %s: downloaded the swarm's state at outer step %d (%.1f MB, %.1f s)%s", self.peer_name,
                    reason, self.sync.outer_step_count, got["bytes"] / 1e6, time.perf_counter() - t0,
                    "" if final else f"; {left} inner steps left in this round")
        return True

    def _finish_together(self) -> None:
        """After the run's last outer step: if a live peer holds a better final state (it averaged a group while
        this peer's side of the all-reduce failed), download it; otherwise keep serving this peer's state while
        peers that need it catch up (one that stepped alone, or one late for the last group), at most
        ``finish_wait`` seconds (see :func:`protocols.diloco.plan_finish`). So the peers that finish a run together
        end it with the same model."""
        from hivemind.utils import get_dht_time

        from protocols.diloco import plan_finish

        wait = self.sync.config.finish_wait
        me, t0, downloaded, said = self.dht.peer_id.to_bytes(), time.monotonic(), False, False
        while not self._stop.is_set():
            plan = plan_finish(self._fetch(), me, self.sync.outer_step_count, self.sync.group_score, get_dht_time(),
                               horizon=wait - (time.monotonic() - t0))
            if plan.download and not downloaded:
                downloaded = True
                if self._adopt_swarm_state("caught up"):
                    self.save_checkpoint()
                continue
            if not plan.wait_for:
                return
            if time.monotonic() - t0 > wait:
                logger.info("peer %s: leaving after %.0f s although %d peer(s) may still need its final state",
                            self.peer_name, wait, len(plan.wait_for))
                return
            if not said:
                said = True
                logger.info("peer %s: waiting up to %.0f s for %d peer(s) to finish the last outer step with it",
                            self.peer_name, wait, len(plan.wait_for))
            self._stop.wait(0.5)

    # ---------------------------------------------------------------- training
    def _log_event(self, event: Dict[str, Any]) -> None:
        event = dict(event, time=time.time(), peer=self.peer_name)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def _inner_step(self) -> float:
        cfg = self.cfg
        global_step = self.sync.outer_step_count * cfg.inner_steps + self.inner_step
        total = cfg.outer_steps * cfg.inner_steps
        lr = inner_lr(global_step, peak=cfg.lr, warmup=cfg.warmup, total=total)
        # a peer that joined mid-run starts with a fresh AdamW: warm it up again over a few steps
        fresh = getattr(self, "_fresh_inner_optimizer_steps", None)
        if fresh is not None and fresh < cfg.warmup // 3:
            lr *= (fresh + 1) / max(1, cfg.warmup // 3)
            self._fresh_inner_optimizer_steps = fresh + 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.sampler.batch(self.batches_used)
        self.batches_used += 1
        loss = lm_loss(self.model, batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_step += 1
        self.tokens_total += batch[:, :-1].numel()
        return loss.item()

    def run(self) -> Dict[str, Any]:
        """Train until ``outer_steps`` outer steps are done (or :meth:`stop`); returns a summary dict.

        :raises RunMismatchError: if the run's live peers train another model
        :raises hivemind.p2p.P2PDaemonError: if the libp2p daemon refuses ``host_maddrs`` or cannot reach
            ``initial_peers``
        """
        cfg = self.cfg
        publisher = None
        try:
            self._start_network()
            progress = self._fetch(check_model=True)
            resumed = cfg.resume and self.load_checkpoint()
            logger.info("peer %s: %d live peers in run %r", self.peer_name, len(progress), cfg.run_id)
            ahead = [r for r in progress.values() if r.outer_step > self.sync.outer_step_count]
            same = [r for r in progress.values() if r.outer_step == self.sync.outer_step_count]
            if ahead or (same and not resumed and self.sync.outer_step_count == 0 and
                         any(r.inner_step > 0 for r in same)):
                self._adopt_swarm_state("joined" if not resumed else "resumed behind the swarm")
            elif same:
                self.inner_step = cfg.inner_steps - self._steps_left_in_round(progress)
            self._publish()
            publisher = threading.Thread(target=self._publisher, daemon=True)
            publisher.start()
            session_outer = 0
            while self.sync.outer_step_count < cfg.outer_steps and not self._stop.is_set():
                if not self._run_round():
                    break
                session_outer += 1
                if cfg.stop_after is not None and session_outer >= cfg.stop_after:
                    logger.info("peer %s: stopping after %d outer steps in this session", self.peer_name, session_outer)
                    break
            finished = self.sync.outer_step_count >= cfg.outer_steps
            if finished and not self._stop.is_set():
                self._finish_together()
            stopped = self._stop.is_set()  # asked to leave (SIGTERM / Ctrl-C / stop())
            return self._finish(finished, stopped)
        finally:
            self._stop.set()
            with contextlib.suppress(Exception):
                self._publish(left=True)
            if publisher is not None:
                publisher.join(timeout=5)
            self._shutdown_network()

    def _run_round(self) -> bool:
        """Inner steps up to H, then one outer step. False if the peer was asked to stop."""
        from hivemind.utils import get_dht_time

        from protocols.diloco import plan_outer_step

        cfg = self.cfg
        start_inner = self.inner_step
        t_round = time.perf_counter()
        t_log, tokens_log, losses = time.perf_counter(), 0, []
        while self.inner_step < cfg.inner_steps:
            if self._stop.is_set():
                return False
            t = time.perf_counter()
            loss = self._inner_step()
            dt = time.perf_counter() - t
            self._rate = 0.8 * self._rate + 0.2 / max(dt, 1e-6) if self._rate else 1.0 / max(dt, 1e-6)
            losses.append(loss)
            tokens_log += cfg.batch_size * cfg.seq_len
            global_step = self.sync.outer_step_count * cfg.inner_steps + self.inner_step
            self.history["inner"].append(dict(step=global_step, loss=loss, tokens=self.tokens_total))
            if self.inner_step % cfg.log_every == 0 or self.inner_step == cfg.inner_steps:
                elapsed = time.perf_counter() - t_log
                mean_loss = sum(losses) / len(losses)
                tps = tokens_log / max(elapsed, 1e-9)
                logger.info("peer %s step %d | outer %d | loss %.4f | %.0f tokens/s | sent %.2f MB",
                            self.peer_name, global_step, self.sync.outer_step_count, mean_loss, tps,
                            self.bytes_sent_total / 1e6)
                self._log_event(dict(kind="inner", step=global_step, outer_step=self.sync.outer_step_count,
                                     loss=mean_loss, tokens_per_s=tps, bytes_sent=self.bytes_sent_total,
                                     tokens=self.tokens_total))
                t_log, tokens_log, losses = time.perf_counter(), 0, []
        steps_done = self.inner_step - start_inner
        compute_s = time.perf_counter() - t_round

        with contextlib.suppress(Exception):
            self._publish()  # inner steps done: the others plan their outer step from this record
        progress = self._fetch()
        plan = plan_outer_step(progress, self.dht.peer_id.to_bytes(), self.sync.outer_step_count,
                               self.sync.group_score, get_dht_time(), min_wait=self.sync.config.min_wait,
                               max_wait=self.sync.config.max_wait, slack=self.sync.config.slack)
        if plan.behind and self._caught_up_at != self.sync.outer_step_count:
            # the swarm finished this outer step without us (or we sit in a smaller, split-off group);
            # at most once per outer step, so that a stale record cannot keep us downloading
            if self._adopt_swarm_state("caught up"):
                return True
        report = self.sync.outer_step(weight=max(steps_done, 1) / cfg.inner_steps, deadline=plan.deadline,
                                      expected_group=plan.expected)
        self.inner_step = 0
        self.bytes_sent_total += report.bytes_sent
        val = evaluate(self.model, self.val_tokens, seq_len=cfg.seq_len, num_sequences=cfg.eval_sequences) \
            if cfg.eval_sequences else float("nan")
        entry = dict(kind="outer", outer_step=report.outer_step, step=report.outer_step * cfg.inner_steps,
                     group_size=report.group_size, expected_group=plan.expected, weight=steps_done / cfg.inner_steps,
                     weight_total=report.weight_total, bytes_sent=report.bytes_sent,
                     bytes_received=report.bytes_received, bytes_sent_total=self.bytes_sent_total,
                     seconds=report.seconds, wait_seconds=report.wait_seconds, compute_seconds=compute_s,
                     pseudo_grad_norm=report.pseudo_grad_norm, val_loss=val, error=report.error,
                     retries=report.retries, note=report.note,
                     tokens=self.tokens_total)
        self.history["outer"].append(entry)
        with contextlib.suppress(Exception):
            self._publish()  # tell the swarm at once that we moved on (the periodic refresh may be seconds away)
        self._log_event(entry)
        logger.info("peer %s outer step %d | group %d/%d | val loss %.4f | sent %.2f MB, received %.2f MB | "
                    "%.1f s waiting+all-reduce%s", self.peer_name, report.outer_step, report.group_size,
                    plan.expected, val, report.bytes_sent / 1e6, report.bytes_received / 1e6, report.wait_seconds,
                    f" | {report.error or report.note}" if report.error or report.note else "")
        self.save_checkpoint()
        if report.stale_anchor:  # averaged with the main group over another anchor: take the main group's state
            self._adopt_swarm_state("caught up")
        return True

    def _finish(self, finished: bool, stopped: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        val = evaluate(self.model, self.val_tokens, seq_len=cfg.seq_len, num_sequences=max(cfg.eval_sequences, 64))
        if cfg.save_model and finished:
            out = self.run_dir / "model"
            tmp = self.run_dir / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        with contextlib.suppress(Exception):
            plot_loss_curves({self.peer_name: self.history}, self.run_dir / "loss.png",
                             title=f"DiLoCo peer {self.peer_name}")
        traffic = self.sync.averager.traffic.snapshot()
        summary = dict(peer=self.peer_name, finished=finished, stopped=stopped, outer_steps=self.sync.outer_step_count,
                       val_loss=val, tokens=self.tokens_total, bytes_sent=self.bytes_sent_total, traffic=traffic,
                       model_dir=str(self.run_dir / "model") if cfg.save_model and finished else None)
        with open(self.run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        logger.info("peer %s done: %d outer steps, val loss %.4f, %.2f MB sent", self.peer_name,
                    self.sync.outer_step_count, val, self.bytes_sent_total / 1e6)
        return summary


def plot_loss_curves(histories: Dict[str, Dict[str, List[Dict[str, Any]]]], path: os.PathLike,
                     title: str = "training loss", smooth: int = 10) -> None:
    """Write a PNG: per run, the training loss (moving average over ``smooth`` inner steps, thin line) and the
    validation loss (markers) against the global inner step.

    :param histories: by label, ``{"inner": [{"step", "loss"}...], "outer": [{"step", "val_loss"}...]}``
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, hist) in enumerate(histories.items()):
        color = f"C{i}"
        inner = sorted(hist.get("inner", []), key=lambda e: e["step"])
        if inner:
            steps = np.array([e["step"] for e in inner])
            losses = np.array([e["loss"] for e in inner])
            k = max(1, min(smooth, len(losses)))
            smoothed = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smoothed, color=color, lw=1, alpha=0.6, label=f"{label} train")
        outer = [e for e in hist.get("outer", []) if e.get("val_loss") is not None and
                 math.isfinite(e.get("val_loss", float("nan")))]
        if outer:
            ax.plot([e["step"] for e in outer], [e["val_loss"] for e in outer], "o-", color=color, ms=4,
                    label=f"{label} validation")
    ax.set_xlabel("inner step (per worker)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (a peer that joined at the end has no curve)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def install_signal_handlers(peer: TrainingPeer) -> None:
    """SIGTERM / SIGINT make the peer leave gracefully after its current inner step (installed again once the
    peer's network is up, because starting hivemind's averager process sets SIGINT to be ignored)."""
    peer._stop_signals = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: peer.stop())


def stop_children(grace: float = 3.0) -> None:
    """Kill this process's multiprocessing children (hivemind's DHT and averager processes) that are still alive
    ``grace`` seconds after their shutdown was asked for. hivemind terminates a child that misses its shutdown
    timeout but does not wait for it, and Python's exit then joins every child: a child stuck after a terminal's
    Ctrl-C (SIGINT reaches the whole process group) kept a stopped training peer from ever exiting."""
    import multiprocessing

    deadline = time.monotonic() + grace
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            logger.warning("network process %d did not stop; killing it", child.pid)
            child.kill()
            child.join(5)
