"""Signed peer records in the DHT.

Every peer that serves a model stores one record under the DHT key ``model_key(model_uid)``, with its
base58 peer id as the sub-key and an expiration time ``now + ttl``; it re-stores the record every
``ttl / 3`` seconds, so a peer that dies disappears from the DHT within ``ttl`` seconds.

The stored value is a msgpack map ``{"b": body, "k": public_key, "s": signature}`` where ``body`` is the
msgpack-encoded record, ``public_key`` the raw 32-byte Ed25519 key, and ``signature`` its signature of
``body``. A reader accepts a record only if the signature verifies, the key's libp2p peer id equals both the
record's ``peer_id`` and the DHT sub-key, and every field passes :meth:`PeerRecord.from_dict` validation.
Anything else is ignored (and logged at debug level), never trusted.

So that a client of a model nobody serves can say what the swarm does serve, every joining or online peer also
stores its signed record under the swarm-wide key :data:`MODELS_KEY` with its model id as the sub-key (peers of one
model overwrite each other's entry; it expires ``ttl`` seconds after the model's last peer stopped refreshing it).
:func:`parse_model_index` verifies these entries the same way; a reader counts a model's peers under its own key.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import msgpack

from protocols import PROTOCOL_VERSION
from protocols.identity import Identity, peer_id_from_public_key, verify_signature

logger = logging.getLogger(__name__)

STATES = ("joining", "online", "offline")
MAX_RECORD_BYTES = 8192
MAX_BLOCKS = 10_000
# Sanity caps: a reader refuses values no hardware could give.
MAX_TOKENS_PER_S = 1e9
MAX_CACHE_TOKENS = 1e10
MAX_MEMORY_BYTES = 1 << 50
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


class RecordError(ValueError):
    """A DHT record that is malformed, unsigned, or signed by the wrong key."""


def model_key(model_uid: str) -> str:
    """The DHT key under which all peers serving ``model_uid`` store their records."""
    return f"{model_uid}.peers"


# the swarm-wide index of served models: sub-key model id -> the signed record of one of its peers
MODELS_KEY = "swarm.models"


def _finite_nonneg(name: str, value: Any, cap: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > cap:
        raise RecordError(f"{name}={value} is outside [0, {cap:g}]")
    return value


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RecordError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _short_str(name: str, value: Any, limit: int = 128) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise RecordError(f"{name} must be a string of at most {limit} characters")
    return value


@dataclass
class PeerRecord:
    """What a peer announces about itself.

    Throughput figures are per block: ``forward_tps`` is prefill/forward tokens per second through one block
    and ``decode_sps`` is batch-1 decode steps per second through one block, so a span of n blocks serves
    about ``decode_sps / n`` steps/s. ``free_cache_tokens`` is how many more KV-cache tokens (summed over
    sessions, per block of the span) the peer can give to new sessions now.
    """

    peer_id: str
    model: str
    start: int
    end: int
    state: str = "joining"
    device: str = "cpu"
    device_name: str = ""
    dtype: str = "float32"
    forward_tps: float = 0.0
    decode_sps: float = 0.0
    free_cache_tokens: int = 0
    max_cache_tokens: int = 0
    block_memory_bytes: int = 0
    cache_memory_bytes: int = 0
    addrs: List[str] = field(default_factory=list)
    network: Dict[str, List[float]] = field(default_factory=dict)  # peer id -> [rtt_s, bandwidth_bytes_per_s]
    # placement (older readers ignore these fields; a record without them reads as a fixed peer of unknown size)
    max_blocks: int = 0  # most blocks this peer can hold; 0: unknown (assume its span)
    balancing: bool = False  # it moves itself when the swarm's rebalancing plan says so
    moving: float = 0.0  # wall-clock time its current move began (it loads or drains a span); 0 when not moving
    version: int = PROTOCOL_VERSION
    timestamp: float = 0.0

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "PeerRecord":
        """Validate and build a record. :raises RecordError: on any missing, mistyped or absurd field."""
        if not isinstance(d, dict):
            raise RecordError("record body must be a map")
        unknown = set(d) - set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k not in unknown}  # newer peers may add fields; ignore them
        try:
            rec = cls(**d)
        except TypeError as e:
            raise RecordError(f"record is missing fields: {e}") from e
        _short_str("peer_id", rec.peer_id, 64)
        if not _NAME_RE.match(rec.model or ""):
            raise RecordError(f"bad model name {rec.model!r}")
        _int_in("start", rec.start, 0, MAX_BLOCKS - 1)
        _int_in("end", rec.end, rec.start + 1, MAX_BLOCKS)
        if rec.state not in STATES:
            raise RecordError(f"state must be one of {STATES}, got {rec.state!r}")
        _short_str("device", rec.device, 32)
        _short_str("device_name", rec.device_name)
        _short_str("dtype", rec.dtype, 16)
        rec.forward_tps = _finite_nonneg("forward_tps", rec.forward_tps, MAX_TOKENS_PER_S)
        rec.decode_sps = _finite_nonneg("decode_sps", rec.decode_sps, MAX_TOKENS_PER_S)
        _finite_nonneg("free_cache_tokens", rec.free_cache_tokens, MAX_CACHE_TOKENS)
        _finite_nonneg("max_cache_tokens", rec.max_cache_tokens, MAX_CACHE_TOKENS)
        _finite_nonneg("block_memory_bytes", rec.block_memory_bytes, MAX_MEMORY_BYTES)
        _finite_nonneg("cache_memory_bytes", rec.cache_memory_bytes, MAX_MEMORY_BYTES)
        if not isinstance(rec.addrs, list) or len(rec.addrs) > 16:
            raise RecordError("addrs must be a list of at most 16 multiaddrs")
        for a in rec.addrs:
            _short_str("addr", a, 256)
        if not isinstance(rec.network, dict) or len(rec.network) > 64:
            raise RecordError("network must be a map of at most 64 peers")
        for pid, figures in rec.network.items():
            _short_str("network peer id", pid, 64)
            if not isinstance(figures, (list, tuple)) or len(figures) != 2:
                raise RecordError("network figures must be [rtt_s, bandwidth_bytes_per_s]")
            _finite_nonneg("rtt", figures[0], 3600.0)
            _finite_nonneg("bandwidth", figures[1], 1e13)
        _int_in("max_blocks", rec.max_blocks, 0, MAX_BLOCKS)
        if not isinstance(rec.balancing, bool):
            raise RecordError("balancing must be true or false")
        rec.moving = _finite_nonneg("moving", rec.moving, 1e11)
        _int_in("version", rec.version, 0, 1 << 30)
        rec.timestamp = _finite_nonneg("timestamp", rec.timestamp, 1e11)
        return rec


def sign_record(record: PeerRecord, identity: Identity) -> bytes:
    """Encode and sign ``record`` with ``identity``; returns the bytes to store in the DHT.

    :raises ValueError: if ``record.peer_id`` is not the identity's peer id.
    """
    if record.peer_id != identity.peer_id.to_base58():
        raise ValueError("a record can only be signed by the key of its own peer id")
    body = msgpack.packb(record.to_dict(), use_bin_type=True)
    return msgpack.packb({"b": body, "k": identity.public_key, "s": identity.sign(body)}, use_bin_type=True)


def verify_record(value: Any, subkey: Optional[str] = None) -> PeerRecord:
    """Check a stored value's signature and contents.

    :param value: the bytes stored in the DHT (as produced by :func:`sign_record`)
    :param subkey: the DHT sub-key it was stored under; must equal the record's peer id
    :raises RecordError: if anything does not verify
    """
    if not isinstance(value, (bytes, bytearray)) or len(value) > MAX_RECORD_BYTES:
        raise RecordError("record must be at most %d bytes" % MAX_RECORD_BYTES)
    try:
        envelope = msgpack.unpackb(value, raw=False)
        body, public_key, signature = envelope["b"], envelope["k"], envelope["s"]
    except Exception as e:
        raise RecordError(f"malformed record envelope: {e}") from e
    if not all(isinstance(x, bytes) for x in (body, public_key, signature)) or len(public_key) != 32:
        raise RecordError("malformed record envelope")
    if not verify_signature(public_key, body, signature):
        raise RecordError("record signature does not verify")
    try:
        record = PeerRecord.from_dict(msgpack.unpackb(body, raw=False))
    except RecordError:
        raise
    except Exception as e:
        raise RecordError(f"malformed record body: {e}") from e
    signer = peer_id_from_public_key(public_key).to_base58()
    if record.peer_id != signer:
        raise RecordError(f"record claims peer {record.peer_id} but is signed by {signer}")
    if subkey is not None and subkey != signer:
        raise RecordError(f"record stored under sub-key {subkey} is signed by {signer}")
    return record


def parse_records(entries: Dict[Any, Any], now: Optional[float] = None) -> List[PeerRecord]:
    """Verify every ``{subkey: value}`` entry fetched from the DHT; drop (and log) the ones that fail.

    ``entries`` maps sub-keys to raw values or to objects with a ``.value`` attribute (hivemind's
    ``ValueWithExpiration``). Records in state ``offline`` are kept so callers can see a peer left.
    """
    records = []
    for subkey, value in (entries or {}).items():
        raw = getattr(value, "value", value)
        try:
            records.append(verify_record(raw, subkey=subkey))
        except RecordError as e:
            logger.debug("ignoring DHT record under sub-key %r: %s", subkey, e)
    return records


def now() -> float:
    return time.time()


def parse_model_index(entries: Dict[Any, Any]) -> Dict[str, PeerRecord]:
    """Verify the ``{model_uid: signed record}`` entries stored under :data:`MODELS_KEY`; keep those whose record
    is signed correctly and names the model of its sub-key. Returns ``{model_uid: record}``."""
    out = {}
    for subkey, value in (entries or {}).items():
        raw = getattr(value, "value", value)
        try:
            record = verify_record(raw)
        except RecordError as e:
            logger.debug("ignoring model-index entry %r: %s", subkey, e)
            continue
        if record.model == subkey:
            out[record.model] = record
    return out
