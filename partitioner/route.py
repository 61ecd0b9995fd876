"""Route selection: the chain of peers a client's request goes through.

Interactive generation takes the lowest-latency chain with KV-cache room (:func:`find_chain`, Dijkstra over block
boundaries with the per-hop model of Petals); independent requests are spread over the chains of the max-flow
solution in proportion to their flow (:class:`FlowRouter`, after Helix), so peers' time is used where it is scarce.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class ServerSpan:
    """A peer as the router sees it: blocks ``[start, end)``, per-block decode steps/s, and the client's
    estimated round-trip time to it in seconds (None if unknown)."""

    peer_id: str
    start: int
    end: int
    decode_sps: float = 1.0
    free_cache_tokens: int = 1 << 30
    rtt: Optional[float] = None


@dataclass(frozen=True)
class Hop:
    """One link of a chain: ``peer_id`` runs blocks ``[start, end)``."""

    peer_id: str
    start: int
    end: int


class NoRouteError(RuntimeError):
    """No chain of live peers covers the requested blocks."""

    def __init__(self, missing: Sequence[int]):
        self.missing = list(missing)
        super().__init__(f"no live peer serves block(s) {_ranges(self.missing)}")


def _ranges(blocks: Sequence[int]) -> str:
    out, blocks = [], sorted(blocks)
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        out.append(f"{blocks[i]}" if i == j else f"{blocks[i]}-{blocks[j]}")
        i = j + 1
    return ", ".join(out)


def find_chain(
    spans: Sequence[ServerSpan],
    start: int,
    end: int,
    *,
    banned: Collection[str] = (),
    min_cache_tokens: int = 0,
    hop_cost: float = 0.018,
    default_rtt: float = 0.005,
) -> List[Hop]:
    """The lowest-latency chain of peers covering blocks ``[start, end)``.

    Dijkstra over block boundaries: entering peer p at block b and leaving it at the end of its span costs
    ``rtt_p / 2 + hop_cost + (blocks run) / decode_sps_p`` seconds (the per-hop model Petals uses).

    :param banned: peer ids not to use (recently failed)
    :param min_cache_tokens: skip peers with fewer free KV-cache tokens than this
    :raises NoRouteError: naming the blocks that no usable peer serves
    """
    usable = [
        s for s in spans
        if s.peer_id not in banned and s.free_cache_tokens >= min_cache_tokens and s.end > start and s.start < end
    ]
    dist: Dict[int, float] = {start: 0.0}
    prev: Dict[int, Tuple[int, ServerSpan]] = {}
    heap = [(0.0, start)]
    while heap:
        d, b = heapq.heappop(heap)
        if b == end:
            break
        if d > dist.get(b, float("inf")):
            continue
        for s in usable:
            if s.start <= b < s.end:
                e = min(s.end, end)
                rtt = s.rtt if s.rtt is not None else default_rtt
                cost = d + rtt / 2 + hop_cost + (e - b) / max(s.decode_sps, 1e-9)
                if cost < dist.get(e, float("inf")):
                    dist[e] = cost
                    prev[e] = (b, s)
                    heapq.heappush(heap, (cost, e))
    if end not in dist:
        covered = set()
        for s in usable:
            covered.update(range(max(s.start, start), min(s.end, end)))
        missing = [b for b in range(start, end) if b not in covered]
        if not missing:  # covered, but not reachable contiguously from start (cannot happen with contiguous spans)
            missing = [max(dist)]
        raise NoRouteError(missing)
    chain, b = [], end
    while b != start:
        a, s = prev[b]
        chain.append(Hop(s.peer_id, a, b))
        b = a
    return chain[::-1]


class FlowRouter:
    """Spreads independent requests over chains in proportion to their flow (tokens/s).

    Smooth weighted round-robin (the nginx upstream rule): each pick adds every chain's weight to its credit and
    takes the chain with the most credit, which then pays the total weight. Over any window of picks each chain's
    share is within one pick of its weight's share, so the load each peer sees matches the flow
    :func:`partitioner.flow.max_flow` planned for it.

    :param chains: ``(rate, hops)`` pairs, e.g. from :func:`partitioner.flow.decompose`
    """

    def __init__(self, chains: Sequence[Tuple[float, Sequence[Hop]]]):
        self.chains = [(float(r), list(h)) for r, h in chains if r > 0 and h]
        self.total = sum(r for r, _ in self.chains)
        self._credit = [0.0] * len(self.chains)

    def __len__(self) -> int:
        return len(self.chains)

    def pick(self, banned: Collection[str] = ()) -> List[Hop]:
        """The chain for the next request; chains through ``banned`` peers are skipped.

        :raises NoRouteError: if no chain avoids the banned peers
        """
        best, best_credit = -1, float("-inf")
        total = 0.0
        for i, (rate, hops) in enumerate(self.chains):
            if banned and any(h.peer_id in banned for h in hops):
                continue
            self._credit[i] += rate
            total += rate
            if self._credit[i] > best_credit:
                best, best_credit = i, self._credit[i]
        if best < 0:
            raise NoRouteError([])
        self._credit[best] -= total
        return list(self.chains[best][1])

    @classmethod
    def from_spans(cls, spans: Sequence[ServerSpan], num_blocks: int,
                   network_tps: Optional[Dict[str, float]] = None) -> "FlowRouter":
        """Solve the max-flow over the live peers (``decode_sps`` read as tokens/s through one block of the span;
        ``network_tps[peer_id]`` tokens/s into the span, unlimited if absent) and route by its chains.

        :raises NoRouteError: naming the blocks no peer serves
        """
        from .flow import PlacedPeer, decompose, max_flow, uncovered_blocks

        missing = uncovered_blocks([(s.start, s.end) for s in spans], num_blocks)
        if missing:
            raise NoRouteError(missing)
        net = network_tps or {}
        placed = [PlacedPeer(s.peer_id, s.start, s.end, s.decode_sps, net.get(s.peer_id, 1e12)) for s in spans]
        return cls(decompose(max_flow(placed, num_blocks)))
