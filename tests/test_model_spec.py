"""Model ids and checkpoint errors (protocols/model_spec.py): quick, no network, no peers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from protocols.model_spec import Checkpoint, ModelSpecError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_model_id_depends_on_the_weights_of_a_local_checkpoint(mha_model, gqa_model, tmp_path):
    """Found by a user: two training runs (same folder name and config, different weights) got one id, so a
    swarm mixed their blocks. Identical copies in folders of the same name still share an id."""
    a = _copy(mha_model, tmp_path / "run1" / "ckpt")
    b = _copy(mha_model, tmp_path / "run2" / "ckpt")
    assert Checkpoint(a).model_uid == Checkpoint(b).model_uid
    path = f"{b}/model.safetensors"
    tensors = load_file(path)
    tensors = {n: t + 1e-3 for n, t in tensors.items()}  # another training run: every weight differs a little
    save_file(tensors, path, metadata={"format": "pt"})
    assert Checkpoint(a).model_uid != Checkpoint(b).model_uid
    assert Checkpoint(a).model_uid.startswith("ckpt-")
    # a sharded checkpoint: identical copies agree, a changed shard changes the id
    c = _copy(gqa_model, tmp_path / "g1" / "gqa")
    d = _copy(gqa_model, tmp_path / "g2" / "gqa")
    assert Checkpoint(c).model_uid == Checkpoint(d).model_uid
    shard = sorted(set(json.load(open(f"{d}/model.safetensors.index.json"))["weight_map"].values()))[-1]
    tensors = load_file(f"{d}/{shard}")
    tensors = {n: t * 2 for n, t in tensors.items()}
    save_file(tensors, f"{d}/{shard}", metadata={"format": "pt"})
    assert Checkpoint(c).model_uid != Checkpoint(d).model_uid


def test_a_truncated_shard_or_broken_config_is_a_model_spec_error_naming_the_file(mha_model, tmp_path):
    bad = _copy(mha_model, tmp_path / "truncated")
    path = f"{bad}/model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelSpecError, match="model.safetensors"):
        Checkpoint(bad)
    broken = _copy(mha_model, tmp_path / "broken")
    with open(f"{broken}/config.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ModelSpecError, match="config.json"):
        Checkpoint(broken)


def test_cli_reports_a_truncated_model_in_one_line(mha_model, tmp_path, capsys):
    from swarm.cli import main

    bad = _copy(mha_model, tmp_path / "truncated")
    with open(f"{bad}/model.safetensors", "r+b") as f:
        f.truncate(1000)
    for argv in (["peer", "--model", bad, "--new-swarm"],
                 ["generate", "--model", bad, "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "--prompt", "hi"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "model.safetensors" in err and "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err


def test_an_older_transformers_is_refused_by_name():
    from protocols.model_spec import MIN_TRANSFORMERS, check_transformers

    with pytest.raises(RuntimeError, match=r"transformers 5\.17\.0 is installed; this swarm needs transformers>=5\.24"):
        check_transformers("5.17.0")
    check_transformers(MIN_TRANSFORMERS)
    import transformers

    check_transformers(transformers.__version__)  # what is installed is accepted
