"""The embedded default model: a small Llama-family checkpoint built deterministically (fixed seed).

Its weights are random, so its text is gibberish; it exists so that a swarm can be started and measured on a
machine with no model hub. It is written in the Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer files) and loaded by the same code as any real checkpoint. The shape is the 8-layer model used for
the reference measurements: hidden 256, intermediate 688, 8 heads, 4 KV heads, vocabulary 32000.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

DEFAULT_NAME = "tiny-llama-8l"
DEFAULT_SHAPE = dict(
    num_hidden_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4,
    vocab_size=32000,
)
_SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "en", "ar")]


def cache_dir() -> str:
    """Where built models live: ``$SWARM_HOME`` or ``~/.cache/llm-swarm``."""
    return os.environ.get("SWARM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llm-swarm")


def _build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer: every byte is a token (so any text encodes), the rest of the vocabulary is
    deterministic pseudo-words, so random ids decode to readable strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    words, i = [], 0
    while len(vocab) + len(words) < vocab_size:
        n, parts = i, []
        while True:
            parts.append(_SYLLABLES[n % len(_SYLLABLES)])
            n //= len(_SYLLABLES)
            if n == 0:
                break
        words.append("Ġ" + "".join(parts))
        i += 1
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
        padding_side="left",
    )
    return fast


def build_model(
    path: str,
    *,
    num_hidden_layers: int = 8,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 4,
    vocab_size: int = 32000,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    max_shard_size: Optional[str] = None,
) -> str:
    """Write a randomly initialised Llama checkpoint (deterministic for a given seed) to ``path``.

    :param max_shard_size: e.g. ``"2MB"`` to split the weights over several safetensors shards
    :returns: ``path``
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        # wider than the usual 0.02 so that random weights give varied tokens rather than one repeated token
        initializer_range=0.1,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = 0
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(os.path.abspath(path)) or ".")
    try:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        _build_tokenizer(vocab_size).save_pretrained(tmp)
        with open(os.path.join(tmp, "BUILT_BY_LLM_SWARM.json"), "w") as f:
            json.dump({"seed": seed, "note": "random weights, for tests and demos"}, f)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_model_path() -> str:
    """The path of the embedded default model, building it on first use (a few seconds)."""
    from filelock import FileLock

    root = os.path.join(cache_dir(), "models")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, DEFAULT_NAME)
    with FileLock(path + ".lock"):
        if not os.path.exists(os.path.join(path, "BUILT_BY_LLM_SWARM.json")):
            build_model(path, **DEFAULT_SHAPE)
    return path
