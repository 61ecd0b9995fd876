"""Choosing the span a joining peer takes."""

from __future__ import annotations

from typing import Sequence, Tuple


def choose_span(num_blocks: int, span_length: int, spans: Sequence[Tuple[int, int, float]]) -> int:
    """The first block of the ``span_length``-block window that the swarm serves worst.

    Each block's service is the sum of the announced throughput of the peers holding it; the window whose
    sorted per-block throughputs are lexicographically smallest is chosen (the weakest blocks first), the
    rule Petals uses for a joining server.

    :param num_blocks: blocks in the model
    :param span_length: blocks the joining peer can hold (``1 <= span_length <= num_blocks``)
    :param spans: ``(start, end, throughput)`` of every peer already serving
    :returns: the start block of the chosen window
    :raises ValueError: if ``span_length`` is out of range
    """
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span length {span_length} must be in [1, {num_blocks}]")
    per_block = [0.0] * num_blocks
    for start, end, throughput in spans:
        for b in range(max(start, 0), min(end, num_blocks)):
            per_block[b] += max(throughput, 1e-9)
    best_start, best_key = 0, None
    for start in range(num_blocks - span_length + 1):
        key = sorted(per_block[start : start + span_length])
        if best_key is None or key < best_key:
            best_start, best_key = start, key
    return best_start
