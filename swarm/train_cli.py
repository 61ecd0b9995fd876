"""``swarm train``: run a DiLoCo training peer (see :mod:`peer.trainer`).

Start a run with ``swarm train --new-swarm --model DIR --run-dir out/p0``; it prints its multiaddrs
(``TRAIN_READY ...``). More peers join with ``--initial-peers`` (of any peer or of a ``swarm dht`` node) and the
same ``--run-id``; a peer that joins mid-run downloads the current state from the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_train(args) -> int:
    """``swarm train``: bad arguments, an unknown model and unreachable addresses are one line on stderr and exit
    code 2."""
    import os

    from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError

    from peer.trainer import DEFAULT_CORPUS, RunMismatchError, TrainConfig, TrainingPeer, install_signal_handlers
    from protocols.model_spec import looks_like_path
    from protocols.transport import start_reaper
    from swarm.cli import _refused_addresses

    if not args.initial_peers and not args.new_swarm:
        print("error: pass --initial-peers of a running peer, or --new-swarm to start a run", file=sys.stderr)
        return 2
    if args.min_wait > args.max_wait:
        print(f"error: --min-wait {args.min_wait:g} is above --max-wait {args.max_wait:g}", file=sys.stderr)
        return 2
    if args.model is None:
        from swarm.default_model import default_model_path

        args.model = default_model_path()
    elif looks_like_path(args.model) and not os.path.isdir(os.path.expanduser(args.model)):
        print(f"error: --model {args.model}: no such model directory", file=sys.stderr)
        return 2
    shard, num_shards = args.shard
    cfg = TrainConfig(
        model=args.model, run_dir=args.run_dir, run_id=args.run_id, initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs, corpus=args.corpus or str(DEFAULT_CORPUS), inner_steps=args.inner_steps, outer_steps=args.outer_steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, shard=shard, num_shards=num_shards, data_offset=args.data_offset,
        seed=args.seed, compression=args.compression, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
        min_wait=args.min_wait, max_wait=args.max_wait, eval_sequences=args.eval_sequences, log_every=args.log_every,
        num_threads=args.num_threads, resume=not args.no_resume, save_model=not args.no_save_model,
        stop_after=args.stop_after,
    )
    try:
        peer = TrainingPeer(cfg)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start_reaper()  # if this process is SIGKILLed, its DHT/averager children and p2pd go too
    install_signal_handlers(peer)
    logging.getLogger("trainer").info("training peer starting (run %r)", cfg.run_id)
    peer.on_ready = lambda maddrs: print("TRAIN_READY " + " ".join(maddrs), flush=True)
    try:
        summary = peer.run()
    except P2PDaemonError as e:  # a malformed or unreachable --initial-peers / --host-maddrs address
        return _refused_addresses(args, e)
    except RunMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("TRAIN_DONE " + json.dumps(summary), flush=True)
    # a peer asked to leave (SIGTERM, Ctrl-C) that left cleanly exits 0 as well; 1 means training gave up
    return 0 if summary.get("finished") or summary.get("stopped") or cfg.stop_after else 1


def _shard(text: str):
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError("--shard takes INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/4")
    return index, count


def register(subparsers) -> None:
    """Add the ``train`` subcommand to the ``swarm`` CLI."""
    from swarm.cli import _number, _positive_int, _whole_number

    _count = _whole_number(0)
    p = subparsers.add_parser("train", help="run a DiLoCo training peer (low-communication data-parallel training)")
    p.add_argument("--model", default=None, help="Hugging Face checkpoint directory to start from "
                   "(default: the embedded model); every peer of a run must use the same one")
    p.add_argument("--run-dir", required=True, help="this peer's checkpoint, metrics, loss.png and final model/")
    p.add_argument("--run-id", default="diloco", help="peers with the same run id train together")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--initial-peers", nargs="+", default=[], help="multiaddrs of a peer or DHT node of the run")
    g.add_argument("--new-swarm", action="store_true", help="start a new run (no initial peers)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    p.add_argument("--corpus", default=None, help="a .txt or .txt.gz corpus (default: data/kjv.txt.gz)")
    p.add_argument("--inner-steps", type=_positive_int, default=50, help="H: inner AdamW steps between outer steps")
    p.add_argument("--outer-steps", type=_positive_int, default=10, help="the run ends after this many outer steps")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per inner step")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="peak inner AdamW learning rate")
    p.add_argument("--warmup", type=_count, default=20, help="inner learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--shard", type=_shard, default="0/1", help="INDEX/COUNT: the part of the corpus to train on")
    p.add_argument("--data-offset", type=_count, default=0, help="batches of the shard to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="fp16", choices=["none", "fp16", "8bit"],
                   help="wire compression of the pseudo-gradients in the all-reduce")
    p.add_argument("--outer-lr", type=float, default=0.7, help="outer Nesterov learning rate (DiLoCo: 0.7)")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="outer Nesterov momentum (DiLoCo: 0.9)")
    p.add_argument("--min-wait", type=_number(0), default=4.0, help="seconds an outer step waits for a group at least")
    p.add_argument("--max-wait", type=_number(0, low_open=True), default=90.0, help="seconds an outer step waits for late peers at most")
    p.add_argument("--eval-sequences", type=_count, default=32, help="validation sequences scored after each outer step")
    p.add_argument("--log-every", type=_positive_int, default=10, help="inner steps between progress lines")
    p.add_argument("--num-threads", type=_positive_int, default=1, help="torch CPU threads")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --run-dir")
    p.add_argument("--no-save-model", action="store_true", help="do not write the final model")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop after N outer steps
    p.set_defaults(func=cmd_train)
