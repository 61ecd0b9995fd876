"""RPC names, message metadata schemas and their limits.

Every RPC carries hivemind's protobuf ``ExpertRequest``/``ExpertResponse``: ``tensors`` (see
:mod:`protocols.codec`) plus ``metadata``, a msgpack map validated here. A message that fails validation is
answered with an error naming what is wrong, and nothing is changed on the peer.

Inference (``RPC_INFERENCE``, a bidirectional stream, one per session and peer):

- first request: ``{"session_id": str, "start": int, "end": int, "max_length": int, "batch_size": int}``
  and optionally the first step's tensors (without them it only opens the session: no response);
- each step request: tensors ``[hidden_states [batch, new_tokens, hidden]]`` plus, when the batch has padding,
  ``[attention_mask [batch, new_tokens]]`` (1 = real token, 0 = padding); metadata ``{"step": int}``;
- a replay request (``{"replay": [n_1, n_2, ...]}``) carries the concatenation of earlier steps' hidden states
  and masks, which the peer processes as separate steps of ``n_i`` tokens to rebuild a lost KV cache exactly;
- each response: tensors ``[hidden_states [batch, new_tokens, hidden]]``, metadata ``{"step": int, "length": int,
  "pushed": bool}`` (``pushed``: the output was also pushed to the next peer, so the client need not send it there);
- push (optional): the first request may name the next peer of the chain (``"push_to"``: its peer id,
  ``"push_session"``: the session id there, ``"push_addrs"``: its multiaddrs) and the previous peer
  (``"push_from"``). A peer with ``push_to`` sends each
  step's output to that peer's ``RPC_PUSH`` as soon as it is computed; a peer with ``push_from`` accepts such
  pushes from that peer only and computes each step from whichever copy arrives first (the push, or the
  client's request with the same ``"step"``, the session's token count before the step), answering once.
  Replays are never pushed. With ``"keep_outputs": true`` as well, the peer keeps every output of the session
  and answers a step it pushed without tensors (``"pushed": true``), unless the step request says ``"full":
  true``; an outputs request ``{"outputs": [a, b]}`` (no tensors) is answered with the kept outputs of token
  positions ``a .. b-1``, ``[batch, b - a, hidden]``, metadata ``{"outputs": [a, b]}`` (the client fetches
  them only to replay them into a replacement for the next peer, or when a push did not arrive). With
  ``"silent": true`` too (the client asks it of a chain's first peer, whose input always comes from the client),
  a pushed step gets no response at all; the client learns of a lost push or a failed peer when it fetches the
  output.

Push (``RPC_PUSH``, a stream from a peer to the next peer of a chain, one per session): each request carries
tensors ``[hidden_states, (attention_mask)]`` as in a step request and metadata ``{"session_id": str, "step":
int}``; there are no responses. Pushes for unknown sessions or from other peers are ignored.

Forward (``RPC_FORWARD``): one request ``{"start", "end"}`` with ``[hidden_states, (attention_mask)]``; one
response with the output hidden states. No cache is kept.
"""

from __future__ import annotations

from typing import Any, Dict

import msgpack

RPC_INFO = "swarm.info"
RPC_FORWARD = "swarm.forward"
RPC_INFERENCE = "swarm.inference"
RPC_PUSH = "swarm.push"  # a peer sends a step's output to the next peer of the chain
RPC_PING = "swarm.ping"  # unary echo of a payload's size: round-trip time and bandwidth probes
MAX_PING_BYTES = 1 << 20

MAX_METADATA_BYTES = 64 * 1024
MAX_SESSION_ID = 64
MAX_BATCH = 1024
MAX_REPLAY_CHUNKS = 100_000


class ProtocolError(ValueError):
    """A message that does not follow the schema."""


def pack(metadata: Dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def unpack(data: bytes) -> Dict[str, Any]:
    """:raises ProtocolError: if ``data`` is not a msgpack map within the size limit."""
    if not data:
        return {}
    if len(data) > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata of {len(data)} bytes is over the {MAX_METADATA_BYTES}-byte limit")
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise ProtocolError(f"malformed metadata: {e}") from e
    if not isinstance(value, dict):
        raise ProtocolError("metadata must be a map")
    return value


def get_int(meta: Dict[str, Any], key: str, lo: int, hi: int, default: Any = ...) -> int:
    """:raises ProtocolError: if the field is missing (and has no default) or not an int in ``[lo, hi]``."""
    if key not in meta:
        if default is ...:
            raise ProtocolError(f"missing field {key!r}")
        return default
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def get_str(meta: Dict[str, Any], key: str, max_len: int) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ProtocolError(f"field {key!r} must be a non-empty string of at most {max_len} characters")
    return value
