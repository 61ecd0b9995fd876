"""Shared fixtures: small random Llama checkpoints (fixed seeds, Hugging Face layout) and local swarms."""

import os
import tempfile

import pytest

# Keep built models and throughput caches out of the user's home, and transformers quiet.
os.environ.setdefault("SWARM_HOME", tempfile.mkdtemp(prefix="swarm-test-home-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_CONFIGS = {
    # multi-head attention, even number of blocks
    "mha": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=600, seed=1),
    # grouped-query attention (8 query heads share 2 KV heads), odd number of blocks
    "gqa_odd": dict(num_hidden_layers=5, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=700, seed=2, max_shard_size="150KB"),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from swarm.default_model import build_model

    root = tmp_path_factory.mktemp("models")
    built = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_model(str(root / name), **MODEL_CONFIGS[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def mha_model(model_dir):
    return model_dir("mha")


@pytest.fixture(scope="session")
def gqa_model(model_dir):
    return model_dir("gqa_odd")
