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


PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWSq7mDhKjPFWuW8XVVxvnLk2uBLvCujEge1c8B8cYNo6G"


@pytest.mark.parametrize("argv,message", [
    # found by users: these were checked only after joining the swarm (or not at all)
    (["generate", "--initial-peers", PEER, "--prompt", "hi", "--top-k", "0"], "argument --top-k: must be at least 1"),
    (["generate", "--initial-peers", PEER, "--prompt", "hi", "--top-k", "-3"], "argument --top-k: must be at least 1"),
    (["generate", "--initial-peers", PEER, "--prompt", "hi", "--repetition-penalty", "0"],
     "argument --repetition-penalty: must be above 0"),
    (["generate", "--initial-peers", PEER, "--prompt", "hi", "--repetition-penalty", "nan"],
     "argument --repetition-penalty: must be above 0"),
    (["generate", "--initial-peers", PEER, "--prompt", "hi", "--max-new-tokens", "0"],
     "argument --max-new-tokens: must be at least 1"),
    (["--log-level", "FOO", "generate", "--initial-peers", PEER, "--prompt", "hi"],
     "argument --log-level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    # said "argument --blocks: expected one argument"
    (["peer", "--new-swarm", "--blocks", "-1:3"], "argument --blocks: blocks are numbered from 0"),
    (["peer", "--new-swarm", "--blocks=-1:3"], "argument --blocks: blocks are numbered from 0"),
    (["peer", "--new-swarm", "--blocks", "a:b"], "argument --blocks: takes START:END"),
])
def test_bad_options_are_refused_while_parsing(argv, message, capsys, monkeypatch):
    import swarm.cli as cli

    def no_network(*_, **__):
        raise AssertionError("the command ran")
    monkeypatch.setattr(cli, "cmd_generate", no_network)
    monkeypatch.setattr(cli, "cmd_peer", no_network)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("swarm"), err


def test_log_level_names_are_case_insensitive():
    from swarm.cli import build_parser

    assert build_parser().parse_args(["--log-level", "debug", "sim", "up"]).log_level == "DEBUG"


def test_a_key_file_in_use_by_a_running_process_is_refused(mha_model, tmp_path):
    """Found by a user: two peers started with one --identity ran side by side without a word (libp2p accepts two
    daemons with one peer id; the swarm then mixes them up). The second now refuses to start, in one line."""
    key = tmp_path / "shared.key"
    first = subprocess.Popen([sys.executable, "-m", "swarm.cli", "dht", "--identity", str(key)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("DHT_READY"):
                break
        assert first.poll() is None
        for argv in (["peer", "--model", mha_model, "--new-swarm", "--identity", str(key)],
                     ["dht", "--identity", str(key)]):
            second = subprocess.run([sys.executable, "-m", "swarm.cli", *argv], cwd=ROOT, capture_output=True,
                                    text=True, timeout=60)
            err = second.stderr.strip()
            assert second.returncode == 2, (argv, second.returncode, err[-500:])
            assert err.startswith("error:") and len(err.splitlines()) == 1 and "already used" in err, err
            assert str(key) in err
    finally:
        first.terminate()
        first.wait(timeout=20)
        first.stdout.close()
    # once the first one has exited, the key is free again
    from protocols.identity import lock_identity
    import protocols.identity as identity

    lock_identity(str(key))
    identity._HELD_LOCKS.pop().close()


def test_ctrl_c_before_a_command_handles_it_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first second of `swarm generate` or `swarm peer` (while they import the network stack) printed
    a 20-30 line KeyboardInterrupt traceback."""
    import swarm.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_peer", interrupted)
    assert cli.main(["peer", "--new-swarm", "--blocks", "0:1"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["peer", "--blocks", "0:1"]])
def test_an_older_transformers_is_a_one_line_error(command, monkeypatch, capsys):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWR1jGYtyz7wQNKLaRu9drW3eWWXbtu715Hy7DYJBjip5c"]
    _one_line_error(capsys, command + peers, "transformers 5.17.0 is installed", "transformers>=5.24")
