"""The ``swarm`` command line: ``swarm dht``, ``swarm peer``, ``swarm generate``, ``swarm sim up``."""

from __future__ import annotations

import argparse
import functools
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from typing import List, Optional


def _setup_logging(level: str = "INFO") -> None:
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # hivemind's own handler; our logs say what happens
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("hivemind", "asyncio", "filelock", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def resolve_model(model: Optional[str]) -> str:
    """``None`` means the embedded default model (built on first use)."""
    if model:
        return model
    from swarm.default_model import default_model_path

    return default_model_path()


def _check_device(device: str) -> None:
    """:raises ValueError: if ``device`` is not one this machine's torch can use."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def _whole_number(low: int):
    """An argparse type: a whole number of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1)


def _number(low: float, high: float = float("inf"), *, low_open: bool = False, high_closed: bool = False):
    """An argparse type: a float in ``[low, high)``; ``low_open`` excludes ``low``, ``high_closed`` includes
    ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not (value > low if low_open else value >= low) or not (value <= high if high_closed else value < high):
            where = f"above {low:g}" if low_open else f"at least {low:g}"
            if high < float("inf"):
                where += f" and {'at most' if high_closed else 'below'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    return parse


def _blocks(text: str):
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes START:END, e.g. 0:4, got {text!r}")
    if start < 0 or end < 0:
        raise argparse.ArgumentTypeError(f"blocks are numbered from 0: START:END with 0 <= START < END, got {text}")
    if end <= start:
        raise argparse.ArgumentTypeError(f"{text} is an empty or reversed span: START:END with 0 <= START < END")
    return start, end


_SPAN_LIKE = re.compile(r"^-\d*:-?\d*$")


def _join_negative_spans(argv: List[str]) -> List[str]:
    """``--blocks -1:3`` as ``--blocks=-1:3``: argparse takes a value starting with ``-`` for an option and would
    only say "expected one argument"; joined, the value reaches :func:`_blocks`, which says what is wrong."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--blocks" and i + 1 < len(argv) and _SPAN_LIKE.match(argv[i + 1]):
            out.append(f"--blocks={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)} (any case), got {text!r}")
    return level


# ------------------------------------------------------------------------------------------------ dht
def _refused_addresses(args, error: Exception) -> int:
    """One-line error for a malformed or unreachable --initial-peers / --host-maddrs address; exit code 2."""
    given = " ".join(args.initial_peers + args.host_maddrs)
    print(f"error: the libp2p daemon refused the addresses given ({given}): {error}", file=sys.stderr)
    return 2


def cmd_dht(args) -> int:
    from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

    from protocols.transport import PortInUseError, create_dht_node, create_p2p, start_reaper

    if args.identity:  # an Ed25519 key like a peer's (the daemon itself would create an RSA key)
        from protocols.identity import Identity, lock_identity

        try:
            Identity.load_or_create(args.identity)
            lock_identity(args.identity)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    start_reaper()

    async def main():
        try:
            p2p = await create_p2p(host_maddrs=args.host_maddrs, identity_path=args.identity)
            node = await create_dht_node(p2p, args.initial_peers)
        except (PortInUseError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except P2PDaemonError as e:
            return _refused_addresses(args, e)
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        print("Bootstrap node running. Pass these to other peers and clients as --initial-peers:", flush=True)
        for m in maddrs:
            print(f"  {m}", flush=True)
        print("DHT_READY " + " ".join(maddrs), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for what in (node.shutdown(), p2p.shutdown()):  # bounded: the daemon may already be gone
            try:
                await asyncio.wait_for(what, 5)
            except Exception:
                pass
        return 0

    return asyncio.run(main())


# ------------------------------------------------------------------------------------------------ peer
def cmd_peer(args) -> int:
    from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

    from peer.server import PeerOptions, run_peer
    from protocols.model_spec import ModelSpecError
    from protocols.transport import PortInUseError

    try:
        _check_device(args.device)
        if args.identity:  # a key file serves one running process: refuse a second one with the same peer id
            from protocols.identity import Identity, lock_identity

            Identity.load_or_create(args.identity)
            lock_identity(args.identity)
        opts = PeerOptions(
            model=resolve_model(args.model), blocks=args.blocks, num_blocks=args.num_blocks,
            initial_peers=args.initial_peers, new_swarm=args.new_swarm, host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs, device=args.device, dtype=args.dtype, identity_path=args.identity,
            max_cache_tokens=args.max_cache_tokens, session_timeout=args.session_timeout,
            num_threads=args.num_threads, throughput=args.throughput, throttle=args.throttle,
            record_ttl=args.record_ttl, crash_at_step=args.crash_at_step, hang_at_step=args.hang_at_step,
            drop_pushes=args.drop_pushes, cuda_graphs=args.cuda_graphs,
            balance=args.balance, rebalance_period=args.rebalance_period, rebalance_min_gain=args.rebalance_min_gain,
            rebalance_delay=args.rebalance_delay,
        )
        return run_peer(opts)
    except (PortInUseError, ModelSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except P2PDaemonError as e:  # a malformed or unreachable --initial-peers / --host-maddrs address
        return _refused_addresses(args, e)


# ------------------------------------------------------------------------------------------------ generate
def cmd_generate(args) -> int:
    """``swarm generate``: errors are one line on stderr and exit code 2; Ctrl-C exits 130 quietly."""
    from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

    from protocols.model_spec import ModelSpecError
    from swarm.client import SwarmError

    try:
        return _generate(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except P2PDaemonError as e:
        print(f"error: cannot reach the swarm at {' '.join(args.initial_peers)}: {_one_line(e)}", file=sys.stderr)
        return 2
    except (SwarmError, ModelSpecError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _streamer(tokenizer):
    """A ``TextStreamer`` that prints the prompt only together with the first generated text: a generation that
    fails before its first token leaves stdout empty (the error is one line on stderr), and one that fails later
    leaves the text generated so far, its line ended."""
    from transformers import TextStreamer

    class PromptHoldingStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_special_tokens=True)
            self.puts = 0
            self.held = ""

        def put(self, value):
            self.puts += 1  # the first put is the prompt
            super().put(value)

        def end(self):
            if self.puts <= 1:  # nothing was generated: drop the prompt instead of printing it
                self.token_cache, self.print_len, self.held, self.puts = [], 0, "", 0
                self.next_tokens_are_prompt = True
                return
            super().end()
            self.puts, self.held = 0, ""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.puts <= 1 and not stream_end:
                self.held += text
                return
            text, self.held = self.held + text, ""
            print(text, flush=True, end="" if not stream_end else None)

    return PromptHoldingStreamer()


def _generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from swarm.client import DistributedModelForCausalLM

    from protocols.model_spec import Checkpoint

    model_path = resolve_model(args.model)
    Checkpoint(model_path)  # an unknown model or path is a ModelSpecError (one line), not a loader traceback
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = args.prompt
    if any(not p for p in prompts):
        raise ValueError("--prompt must not be empty")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if limit and enc["input_ids"].shape[1] + args.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} plus the {enc['input_ids'].shape[1]}-token prompt "
                         f"is over the model's limit of {limit} tokens")
    gen = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
    do_sample = not args.greedy and (args.temperature is not None or args.top_k is not None or args.top_p is not None)
    if args.temperature is not None and args.temperature <= 0:
        do_sample = False  # temperature 0 means greedy decoding
    model = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=args.initial_peers)
    streamer = None
    if not args.json and len(prompts) == 1:
        streamer = _streamer(tokenizer)
    try:
        t0 = time.perf_counter()
        out = model.generate(
            enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=args.max_new_tokens,
            do_sample=do_sample, temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, streamer=streamer, generator=gen,
        )
        elapsed = time.perf_counter() - t0
    finally:
        model.shutdown()
    prompt_len = enc["input_ids"].shape[1]
    new = out[:, prompt_len:]
    if args.json:
        print(json.dumps(_json_result(prompts, enc, new, tokenizer, elapsed)))
    elif streamer is None:
        for i in range(len(prompts)):
            print(tokenizer.decode(out[i], skip_special_tokens=True))
    else:
        print(f"\n[{new.numel()} tokens in {elapsed:.2f}s, {new.numel() / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


def _json_result(prompts, enc, new, tokenizer, elapsed: float) -> dict:
    """``swarm generate --json``'s output, one shape for any number of prompts:
    ``{"results": [{"prompt", "prompt_ids", "new_ids", "text"}, ...], "seconds", "tokens_per_s"}`` with one result
    per ``--prompt`` in order (``prompt_ids`` without padding; ``new_ids`` may end in padding after an
    end-of-sequence token; ``text`` is the new tokens' text)."""
    results = []
    for i, p in enumerate(prompts):
        results.append({
            "prompt": p, "prompt_ids": enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist(),
            "new_ids": new[i].tolist(), "text": tokenizer.decode(new[i], skip_special_tokens=True),
        })
    return {"results": results, "seconds": round(elapsed, 4), "tokens_per_s": round(new.numel() / elapsed, 2)}


# ------------------------------------------------------------------------------------------------ sim
def cmd_sim(args) -> int:
    from protocols.model_spec import ModelSpecError
    from sims.local_swarm import run_sim_up

    try:
        return run_sim_up(
            model=resolve_model(args.model), num_peers=args.peers, blocks_per_peer=args.blocks_per_peer,
            host=args.host, extra_peer_args=args.peer_args or [], log_dir=args.log_dir, keep_logs=args.keep_logs,
        )
    except (ModelSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` text with each option's default, except empty ones (None, False, [])."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run and use a peer-to-peer swarm serving an LLM.")
    parser.add_argument("--log-level", type=_log_level, default=os.environ.get("SWARM_LOG_LEVEL", "INFO"),
                        metavar="{" + ",".join(LOG_LEVELS) + "}", help="log level (default: $SWARM_LOG_LEVEL or INFO)")
    # every command's --help shows each option's default
    with_defaults = functools.partial(argparse.ArgumentParser, formatter_class=_DefaultsHelp)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=with_defaults)

    p = sub.add_parser("dht", help="run a bootstrap DHT node and print its multiaddrs")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="listen multiaddrs")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of other bootstrap nodes")
    p.add_argument("--identity", default=None, help="path of a persistent Ed25519 key (created if missing)")
    p.set_defaults(func=cmd_dht)

    p = sub.add_parser("peer", help="run a peer that serves a span of the model's blocks")
    p.add_argument("--model", default=None, help="local path or Hugging Face hub id (default: the embedded model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--blocks", type=_blocks, default=None, help="START:END, the blocks to serve")
    g.add_argument("--num-blocks", type=int, default=None,
                   help="hold at most this many blocks: the peer picks its span from the swarm's announced figures "
                        "and moves when the swarm's rebalancing plan says so")
    p.add_argument("--balance", action="store_true",
                   help="with --blocks: start on that span, then move like a --num-blocks peer (at most as many "
                        "blocks); a peer started without --blocks balances anyway")
    p.add_argument("--rebalance-period", type=_number(0, low_open=True), default=3.0,
                   help="seconds between a balancing peer's placement checks (x0.5..1.5 jitter)")
    p.add_argument("--rebalance-delay", type=_number(0), default=0.0,
                   help="seconds after start before the first placement check")
    p.add_argument("--rebalance-min-gain", type=_number(0, 1), default=0.1,
                   help="move only if the swarm's estimated throughput rises by this fraction (hysteresis)")
    g2 = p.add_mutually_exclusive_group(required=True)
    g2.add_argument("--initial-peers", nargs="+", default=[], help="multiaddrs of peers already in the swarm")
    g2.add_argument("--new-swarm", action="store_true", help="start a new swarm (no initial peers)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"],
                   help="listen multiaddrs, e.g. /ip4/0.0.0.0/tcp/31337")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs to announce, if not the listen ones")
    p.add_argument("--device", default="cpu", help="torch device of the blocks, e.g. cuda:0")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the blocks (auto: the checkpoint's, float32 on CPU)")
    p.add_argument("--identity", default=None, help="path of a persistent Ed25519 key (created if missing)")
    p.add_argument("--max-cache-tokens", type=_positive_int, default=65536,
                   help="KV-cache budget of each block: tokens (batch x length) summed over all sessions")
    p.add_argument("--session-timeout", type=_number(0, low_open=True), default=300.0, help="close idle sessions after this many seconds")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CUDA device, run each session's decode steps as a CUDA graph (a fixed-size KV cache "
                        "of the session's max_length)")
    p.add_argument("--num-threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--throughput", type=_number(0, low_open=True), default=None, help="announce this per-block throughput, skip measuring")
    p.add_argument("--throttle", type=float, default=1.0, help=argparse.SUPPRESS)  # testing: run N times slower
    p.add_argument("--crash-at-step", type=int, default=None, help=argparse.SUPPRESS)  # testing: SIGKILL itself
    p.add_argument("--hang-at-step", type=int, default=None, help=argparse.SUPPRESS)  # testing: go silent
    p.add_argument("--drop-pushes", action="store_true", help=argparse.SUPPRESS)  # testing: pushes get lost
    p.add_argument("--record-ttl", type=_number(1), default=10.0, help="seconds a DHT record lives unless refreshed")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("generate", help="generate text through the swarm")
    p.add_argument("--model", default=None, help="local path or Hugging Face hub id (default: the embedded model)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any peers of the swarm")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate per prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding even if sampling options are given")
    p.add_argument("--temperature", type=_number(0), default=None, help="sample with this temperature (0: greedy)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=_number(0, 1, low_open=True, high_closed=True), default=None, help="sample from the smallest set of this probability")
    p.add_argument("--repetition-penalty", type=_number(0, low_open=True), default=None,
                   help="penalize tokens already generated (1: no penalty)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"results": [{"prompt", "prompt_ids", "new_ids", "text"}, ...] (one '
                        'per --prompt), "seconds", "tokens_per_s"}')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sim", help="local multi-peer swarms on this machine")
    simsub = p.add_subparsers(dest="sim_command", required=True, parser_class=with_defaults)
    up = simsub.add_parser("up", help="start a bootstrap node and N peers on 127.0.0.1 until Ctrl-C")
    up.add_argument("--peers", type=_positive_int, default=3, help="number of peers")
    up.add_argument("--model", default=None, help="local path or hub id (default: the embedded model)")
    up.add_argument("--blocks-per-peer", type=_positive_int, default=None, help="blocks each peer holds (default: half the model, all of it for one peer; spans laid "
                         "round-robin, so peers beyond two add replicas)")
    up.add_argument("--host", default="127.0.0.1",
                    help="IP address the bootstrap node and the peers listen on (0.0.0.0: every interface)")
    up.add_argument("--log-dir", default=None, help="write the processes' logs to this folder (kept after exit)")
    up.add_argument("--keep-logs", action="store_true",
                    help="keep the temporary log folder after exit (by default it is removed)")
    up.add_argument("--peer-args", nargs=argparse.REMAINDER, help="extra options for every peer")
    up.set_defaults(func=cmd_sim)
    from swarm.train_cli import register as register_train
    register_train(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_spans(list(sys.argv[1:] if argv is None else argv)))
    try:
        _setup_logging(args.log_level)
        if args.func is not cmd_dht:  # every other command runs a model's layers or loads its checkpoint
            import transformers

            from protocols.model_spec import check_transformers
            try:
                check_transformers(transformers.__version__)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling starts (e.g. while importing)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
