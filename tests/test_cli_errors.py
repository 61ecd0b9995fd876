"""One-line CLI errors for bad identities and ``swarm sim up`` options: quick, no swarm needed (except the dht
key test, which starts one bootstrap node for a few seconds)."""

import os
import subprocess
import sys
import time

import pytest

from swarm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_identity_that_is_a_directory_or_garbage_is_a_one_line_error(mha_model, tmp_path, capsys):
    folder = tmp_path / "keys"
    folder.mkdir()
    _one_line_error(capsys, ["peer", "--model", mha_model, "--new-swarm", "--identity", str(folder)], str(folder))
    _one_line_error(capsys, ["dht", "--identity", str(folder)], str(folder))
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff\xfe not a key at all \x00\x01")
    peer_err = _one_line_error(capsys, ["peer", "--model", mha_model, "--new-swarm", "--identity", str(garbage)],
                               "not a libp2p private key")
    dht_err = _one_line_error(capsys, ["dht", "--identity", str(garbage)], "not a libp2p private key")
    assert peer_err == dht_err


def test_dht_creates_an_ed25519_key_like_a_peer(tmp_path):
    from protocols.identity import Identity

    key = tmp_path / "dht.key"
    proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", "dht", "--identity", str(key)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("DHT_READY") or not line:
                break
        assert line.startswith("DHT_READY"), line
        peer_id = Identity.load_or_create(str(key)).peer_id.to_base58()
        assert peer_id.startswith("12D3Koo") and f"/p2p/{peer_id}" in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("option,value", [("--peers", "0"), ("--peers", "-1"), ("--blocks-per-peer", "0")])
def test_sim_up_rejects_counts_below_one(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sim", "up", option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be at least 1" in err, err


def test_sim_up_rejects_more_blocks_per_peer_than_the_model_has(mha_model, capsys):
    # the mha test model has 4 blocks
    _one_line_error(capsys, ["sim", "up", "--model", mha_model, "--peers", "2", "--blocks-per-peer", "5"],
                    "--blocks-per-peer", "4 blocks", "got 5")


def test_sim_up_reports_a_peer_that_exits_at_once_in_one_line(mha_model):
    proc = subprocess.run([sys.executable, "-m", "swarm.cli", "sim", "up", "--model", mha_model, "--peers", "1",
                           "--peer-args", "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: peer0 exited with code 2") and "unrecognized arguments: --bogus" in err, err
