"""Live rebalancing: peers place themselves with the partitioner and move, one at a time and make before break,
while a client generates without a single failed step. Plus unit tests of the decision rule and the move lock."""

import asyncio
import re
import threading
import time

import pytest
import torch

from partitioner.cost import ModelSpec
from peer import rebalancer as rb
from protocols.records import PeerRecord

L = 8
MODEL = ModelSpec(num_blocks=L, block_bytes=1e6, hidden_bytes=1024, cache_bytes_per_token=256, context_tokens=2048)


def _record(pid, span, sps, *, cap=None, balancing=True, moving=0.0, state="online"):
    return PeerRecord(peer_id=pid, model="m", start=span[0], end=span[1], state=state, forward_tps=10 * sps,
                      decode_sps=sps, max_blocks=cap or span[1] - span[0], balancing=balancing, moving=moving,
                      timestamp=time.time())


def _simulate(records, min_gain=0.1, max_moves=10):
    """Run decide() to a fixed point, as the live swarm does one move at a time; returns the placements seen."""
    records = {r.peer_id: r for r in records}
    seen = []
    for _ in range(max_moves):
        view = rb.swarm_view(list(records.values()), MODEL)
        seen.append(dict(view.placement))
        decision, _ = rb.decide(view, min_gain=min_gain)
        if decision is None:
            break
        r = records[decision.peer_id]
        records[r.peer_id] = _record(r.peer_id, decision.new, r.decode_sps, cap=r.max_blocks, balancing=r.balancing)
    return seen


# the live scenario: a slow peer holds every block, three fast ones are stacked on the middle blocks
def _poor():
    """Fresh records (timestamped now: readers drop records older than 1.5 TTL)."""
    return [_record("a-slow", (0, 8), 100.0), _record("b-fast", (2, 6), 1000.0), _record("c-fast", (2, 6), 1000.0),
            _record("d-fast", (2, 6), 1000.0)]


def test_plan_converges_and_each_move_passes_the_hysteresis():
    seen = _simulate(_poor())
    assert len(seen) >= 3  # several moves, one at a time
    est = [rb.estimate(rb.swarm_view(_poor(), MODEL), pl) for pl in seen]
    assert all(b >= a * 1.1 for a, b in zip(est, est[1:]))
    assert est[-1] > 5 * est[0]
    assert rb.unserved_blocks(seen[-1], L) == []


def test_no_move_when_the_gain_is_below_the_threshold():
    for records in (_poor(), [_record("a-slow", (0, 8), 100.0), _record("b-fast", (0, 2), 1000.0, cap=4),
                           _record("c-fast", (2, 6), 1000.0), _record("d-fast", (5, 8), 1000.0, cap=4)]):
        view = rb.swarm_view(records, MODEL)
        small, _ = rb.decide(view, min_gain=0.01)
        assert small is not None and small.after > small.before
        gain = small.after / small.before - 1
        for g in (0.05, 0.1, 0.5, 1.0, 2 * gain):
            decision, why = rb.decide(view, min_gain=g)
            assert decision is None or decision.after >= decision.before * (1 + g), (g, why)
        decision, why = rb.decide(view, min_gain=100.0)
        assert decision is None, why
    # a fixed peer (no --balance) is never the one to move
    first = rb.decide(rb.swarm_view(_poor(), MODEL))[0].peer_id
    fixed = [_record(r.peer_id, (r.start, r.end), r.decode_sps, cap=r.max_blocks, balancing=r.peer_id != first)
             for r in _poor()]
    decision, _ = rb.decide(rb.swarm_view(fixed, MODEL))
    assert decision is None or decision.peer_id != first


def test_a_move_that_fills_a_gap_skips_the_hysteresis():
    gap = [_record("a", (0, 4), 1000.0), _record("b", (0, 4), 1000.0)]
    decision, why = rb.decide(rb.swarm_view(gap, MODEL), min_gain=10.0)
    assert decision is not None and decision.fills and decision.new == (4, 8), why


def test_a_gap_next_to_a_peers_lonely_blocks_is_filled():
    """A spare of 2 blocks at 1:3 after the peer of 2:4 died: it alone serves block 2 and block 3 has no peer. The
    plan cannot move it (the hull 1:4 exceeds its memory), but a live move holds both spans anyway: 1:3 -> 2:4."""
    four = ModelSpec(num_blocks=4, block_bytes=1e6, hidden_bytes=1024, cache_bytes_per_token=256)
    recs = [_record("fixed", (0, 2), 1000.0, balancing=False), _record("spare", (1, 3), 1000.0)]
    decision, why = rb.decide(rb.swarm_view(recs, four), min_gain=0.1)
    assert decision is not None and decision.fills and (decision.peer_id, decision.new) == ("spare", (2, 4)), why


class _FakePeer:
    """What the Rebalancer needs from a peer, over a shared in-memory record store."""

    def __init__(self, store, record, move_seconds=0.3):
        self.store, self.rec, self.move_seconds = store, record, move_seconds
        self.peer_id_str = record.peer_id
        self.moving_since = 0.0
        self.moves = []
        store[self.peer_id_str] = record

    async def fetch_records(self):
        await asyncio.sleep(0.01)
        return list(self.store.values())

    def record(self):
        r = self.rec
        return _record(r.peer_id, (r.start, r.end), r.decode_sps, cap=r.max_blocks, moving=self.moving_since)

    def model_spec(self):
        return MODEL

    async def announce(self):
        self.store[self.peer_id_str] = self.record()
        return True

    async def move(self, start, end, reason="", check=None):
        if check is not None and await check():
            return False
        self.moves.append((time.monotonic(), (self.rec.start, self.rec.end), (start, end)))
        self.rec = _record(self.rec.peer_id, (start, end), self.rec.decode_sps, cap=self.rec.max_blocks)
        await self.announce()
        await asyncio.sleep(self.move_seconds)  # draining the old span
        return True

    async def heal_gaps(self):
        pass


def test_only_the_planned_peer_moves_and_one_at_a_time():
    async def main():
        store = {}
        peers = [_FakePeer(store, r) for r in _poor()]
        bals = [rb.Rebalancer(p, period=0.05, settle=0.1) for p in peers]
        tasks = [asyncio.ensure_future(b.run()) for b in bals]
        await asyncio.sleep(4.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peers

    peers = asyncio.run(main())
    moves = sorted((t, p.peer_id_str, old, new) for p in peers for t, old, new in p.moves)
    assert len(moves) >= 3
    for (t1, *_), (t2, *_) in zip(moves, moves[1:]):
        assert t2 - t1 >= 0.3  # the next move began after the previous one had drained
    final = {p.peer_id_str: (p.rec.start, p.rec.end) for p in peers}
    assert final == _simulate(_poor())[-1]


def test_two_claims_at_once_do_not_both_move():
    """Peers whose views disagree (each thinks it moves first) claim the move in their records; a peer that sees
    another claim backs off, so at most one moves."""
    def pinned(me):
        return lambda view: (rb.Decision(me, view.placement[me], (0, 2), 1.0, 2.0, False), "test")

    async def main(stagger):
        store = {}
        a, b = _FakePeer(store, _poor()[1]), _FakePeer(store, _poor()[2])
        ra = rb.Rebalancer(a, settle=0.3, decide_fn=pinned(a.peer_id_str))
        rb_ = rb.Rebalancer(b, settle=0.3, decide_fn=pinned(b.peer_id_str))

        async def tick(r, delay):
            await asyncio.sleep(delay)
            return await r.tick()

        results = await asyncio.gather(tick(ra, 0.0), tick(rb_, stagger))
        return results, a.moves + b.moves

    for stagger in (0.0, 0.1, 0.25, 0.5):
        results, moves = asyncio.run(main(stagger))
        assert len(moves) <= 1, (stagger, results)
        if stagger >= 0.5:  # the later peer saw the first one's claim and waited
            assert len(moves) == 1 and results[1].startswith("wait: "), results


# ---------------------------------------------------------------------------------------------------------------
# live: a 4-peer local swarm on the default model (8 blocks)
# ---------------------------------------------------------------------------------------------------------------
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def default_model():
    from swarm.default_model import default_model_path

    return default_model_path()


def _leftovers(children):
    import psutil

    time.sleep(1.0)
    left = []
    for c in children:
        try:
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(c.cmdline())[:80])
        except psutil.Error:
            pass
    return left


def test_swarm_rebalances_while_a_client_generates(default_model):
    """A slow peer (10x throttled) holds all 8 blocks and three fast peers are stacked on blocks 2:6. The peers move,
    one at a time, to what the partitioner plans, while a client generates greedily without pause: every output
    equals transformers' and the client never fails over, retries or bans a peer."""
    from transformers import AutoModelForCausalLM

    from protocols.model_spec import Checkpoint, resolve_dtype
    from sims.local_swarm import LocalSwarm
    from swarm.client import DistributedModelForCausalLM

    path = default_model
    ckpt = Checkpoint(path)
    dtype_bytes = torch.tensor([], dtype=resolve_dtype("auto", ckpt.config)).element_size()
    model_spec = rb.model_spec_from_config(ckpt.config, ckpt.num_blocks, dtype_bytes)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 30000, (1, n), generator=gen) for n in (5, 9, 13)]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        expected = [ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS) for p in prompts]
    del ref

    # the first check comes 8 s after each peer is up, so that the client is generating before the first move
    common = ["--balance", "--throughput", "1000", "--rebalance-period", "1", "--rebalance-delay", "8"]
    spans = [(0, 8), (2, 6), (2, 6), (2, 6)]
    args = [common + ["--throttle", "10"], common, common, common]
    t_start = time.time()
    swarm = LocalSwarm(path, spans=spans, peer_args=args, keep_logs=False)
    with swarm:
        children = [c for p in swarm.peers for c in p.descendants()]
        with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as client:
            def view():
                return rb.swarm_view(client.peers(), model_spec)

            v0 = view()
            initial = {swarm.peer_id(i): span for i, span in enumerate(spans)}
            assert set(v0.placement) == set(initial) and v0.complete
            v0.placement = initial  # (a peer may in principle have moved already on a slow machine)
            est0 = rb.estimate(v0, initial)
            planned = _simulate_live(v0)

            results, errors, stop = [], [], threading.Event()

            def generate_forever():
                i = 0
                try:
                    while not stop.is_set():
                        p = prompts[i % len(prompts)]
                        out = client.generate(p, max_new_tokens=NEW_TOKENS, eos_token_id=[])
                        results.append(torch.equal(out, expected[i % len(prompts)]))
                        i += 1
                except Exception as e:  # pragma: no cover - reported by the assertions below
                    errors.append(repr(e))

            worker = threading.Thread(target=generate_forever, daemon=True)
            worker.start()
            t_gen = time.time()
            deadline = t_gen + 75
            converged_at, stable, history = None, 0, [dict(initial)]
            while time.time() < deadline and not errors:
                time.sleep(0.5)
                v = view()
                if v.placement != history[-1]:
                    history.append(dict(v.placement))
                quiet = not v.moving and not v.joining and v.complete and len(v.placement) == 4
                if quiet and v.placement != initial and rb.decide(v)[0] is None:
                    stable += 1
                    converged_at = converged_at or time.time()
                    if stable >= 3:
                        break
                else:
                    stable, converged_at = 0, None
            n_before_stop = len(results)
            time.sleep(1.0)  # at least one more generation on the final placement
            stop.set()
            worker.join(timeout=30)
            final = view()
            est1 = rb.estimate(final, final.placement)
            stats = dict(client.stats)
            moved_lines, overlapping = [], []
            for i in range(4):
                with open(swarm.peers[i].log_path) as f:
                    lines = f.read().splitlines()
                moved_lines += [f"peer{i}: " + line.split(": ", 1)[-1].strip() for line in lines
                                if "now serving blocks" in line or " WARNING " in line]
                # one line per move: the peer's "moving from blocks ...: <reason>", not also the rebalancer's
                assert not [x for x in lines if "peer.rebalancer: rebalancing: " in x], lines
                # a move to a span overlapping the old one keeps the shared blocks (not read again)
                for j, line in enumerate(lines):
                    m = re.search(r"moving from blocks (\d+):(\d+) to (\d+):(\d+)", line)
                    if m:
                        a, b, c, d = map(int, m.groups())
                        if max(a, c) < min(b, d):
                            after = [x for x in lines[j + 1:j + 30] if "keeping blocks" in x or "loaded block" in x]
                            overlapping.append((i, line, after[:1]))
                            assert after and f"keeping blocks {max(a, c)}:{min(b, d)} " in after[0], overlapping[-1]
                            # and drops only the old blocks the new span lacks
                            freed = [x for x in range(a, b) if not c <= x < d]
                            drop = [x for x in lines[j + 1:] if "dropped blocks" in x or "released the old span" in x]
                            if freed and freed == list(range(freed[0], freed[-1] + 1)):
                                assert drop and f"dropped blocks {freed[0]}:{freed[-1] + 1} after" in drop[0], drop
    left = _leftovers(children)
    print(f"\nconverged in {converged_at - t_gen if converged_at else float('nan'):.1f}s after the client started "
          f"({time.time() - t_start:.0f}s in all); estimated {est0:.1f} -> {est1:.1f} tokens/s")
    for pl in history:
        print("  placement:", {k[-6:]: v for k, v in sorted(pl.items())})
    print("  moves:", *moved_lines, sep="\n    ")
    print(f"  {len(results)} generations ({n_before_stop} before convergence), client stats {stats}")
    print(f"  {len(overlapping)} moves to an overlapping span kept the shared blocks")
    assert not errors, errors
    assert converged_at is not None, history
    assert not worker.is_alive()
    assert final.placement == planned, (final.placement, planned)
    assert est1 >= 5 * est0
    assert rb.unserved_blocks(final.placement, 8) == []
    assert len(history) >= 3  # several moves, seen one at a time
    assert results and all(results), results
    assert (stats["failovers"], stats["chain_retries"], stats["bans"]) == (0, 0, 0), stats
    assert left == []


def test_a_joining_peer_takes_the_weakest_blocks_within_its_size():
    me = rb.peer_spec(_record("new", (0, 3), 1000.0, cap=3), MODEL)
    (s, e), rule = rb.join_span(me, MODEL, [_record("a", (0, 5), 1000.0), _record("b", (0, 5), 1000.0),
                                            _record("c", (3, 8), 1000.0)], 3)
    assert rule == "choose_span_for" and (s, e) == (5, 8)  # blocks 5-7 have one peer, 0-2 two
    (s, e), rule = rb.join_span(me, MODEL, [_record("a", (0, 8), 0.0)], 3)  # no figures: the Petals rule
    assert "Petals" in rule and e - s == 3


def _simulate_live(view):
    """The placement the partitioner plans from ``view``, one decide() move at a time (as the peers do)."""
    placement = dict(view.placement)
    for _ in range(10):
        v = rb.SwarmView(view.model, list(view.specs), dict(placement), set(view.movable))
        decision, _ = rb.decide(v)
        if decision is None:
            return placement
        placement[decision.peer_id] = decision.new
    return placement
