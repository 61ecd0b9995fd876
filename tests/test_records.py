"""Signed DHT records: anything that does not verify is ignored by every reader."""

import math

import msgpack
import pytest

from protocols.identity import Identity, peer_id_from_public_key
from protocols.records import PeerRecord, RecordError, parse_records, sign_record, verify_record


def _record(identity, **kw):
    base = dict(peer_id=identity.peer_id.to_base58(), model="m-123", start=0, end=4, state="online",
                decode_sps=100.0, forward_tps=1000.0, free_cache_tokens=1000)
    base.update(kw)
    return PeerRecord(**base)


def test_signed_record_roundtrip():
    ident = Identity.generate()
    value = sign_record(_record(ident), ident)
    rec = verify_record(value, subkey=ident.peer_id.to_base58())
    assert rec.start == 0 and rec.end == 4 and rec.state == "online"


def test_identity_peer_id_matches_libp2p_key(tmp_path):
    ident = Identity.load_or_create(str(tmp_path / "id.key"))
    again = Identity.load_or_create(str(tmp_path / "id.key"))
    assert ident.peer_id == again.peer_id == peer_id_from_public_key(ident.public_key)
    assert ident.peer_id.to_base58().startswith("12D3KooW")  # libp2p's Ed25519 peer ids


def test_bad_signature_is_ignored():
    ident = Identity.generate()
    env = msgpack.unpackb(sign_record(_record(ident), ident))
    body = msgpack.unpackb(env["b"])
    body["end"] = 8  # tamper after signing
    env["b"] = msgpack.packb(body)
    value = msgpack.packb(env)
    with pytest.raises(RecordError, match="signature"):
        verify_record(value)
    assert parse_records({ident.peer_id.to_base58(): value}) == []


def test_record_signed_by_another_key_is_ignored():
    victim, attacker = Identity.generate(), Identity.generate()
    forged = _record(victim)  # claims the victim's peer id
    body = msgpack.packb(forged.to_dict(), use_bin_type=True)
    value = msgpack.packb({"b": body, "k": attacker.public_key, "s": attacker.sign(body)}, use_bin_type=True)
    with pytest.raises(RecordError, match="signed by"):
        verify_record(value)
    assert parse_records({victim.peer_id.to_base58(): value}) == []


def test_record_under_wrong_subkey_is_ignored():
    a, b = Identity.generate(), Identity.generate()
    value = sign_record(_record(a), a)
    assert parse_records({b.peer_id.to_base58(): value}) == []
    assert len(parse_records({a.peer_id.to_base58(): value})) == 1


@pytest.mark.parametrize("field,value", [
    ("decode_sps", -1.0), ("decode_sps", math.nan), ("forward_tps", math.inf), ("forward_tps", 1e30),
    ("start", -1), ("end", 0), ("state", "dancing"), ("free_cache_tokens", -5), ("model", "bad model name!"),
])
def test_absurd_values_are_refused(field, value):
    ident = Identity.generate()
    rec = _record(ident)
    setattr(rec, field, value)
    body = msgpack.packb(rec.to_dict(), use_bin_type=True)
    stored = msgpack.packb({"b": body, "k": ident.public_key, "s": ident.sign(body)}, use_bin_type=True)
    with pytest.raises(RecordError):
        verify_record(stored)


def test_garbage_values_are_ignored():
    assert parse_records({"x": b"\x00garbage", "y": 12345, "z": b"\x81\xa1b\xc4\x00"}) == []


def test_cannot_sign_someone_elses_record():
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(ValueError):
        sign_record(_record(a), b)


def test_model_index_keeps_only_verified_entries_of_their_own_model():
    """The swarm-wide index of served models (MODELS_KEY): sub-key model id -> a peer's signed record."""
    from protocols.records import parse_model_index

    a, b = Identity.generate(), Identity.generate()
    good = sign_record(_record(a, model="m-123"), a)
    wrong_model = sign_record(_record(b, model="m-456"), b)  # stored under another model's sub-key
    env = msgpack.unpackb(sign_record(_record(b, model="m-789"), b))
    env["s"] = bytes(64)
    index = parse_model_index({"m-123": good, "m-999": wrong_model, "m-789": msgpack.packb(env), "x": b"junk"})
    assert list(index) == ["m-123"] and index["m-123"].peer_id == a.peer_id.to_base58()
