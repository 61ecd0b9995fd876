"""What peers and clients must agree on about a model: its checkpoint, config, supported family and DHT id.

A model is named by a local directory or a Hugging Face hub id. Both sides read the same Hugging Face
checkpoint (``config.json`` plus safetensors shards); a peer reads only the tensors of its span, a client only
the embeddings, final norm and LM head (see :meth:`Checkpoint.read_tensors`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

# Decoder-only families whose layers run as-is on a span: pre-norm blocks with rotary embeddings computed once
# per model, ``model.layers[i]`` blocks, ``model.embed_tokens``, ``model.norm`` and ``lm_head``.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(ValueError):
    """The model cannot be found, or is not a family this swarm can serve."""


MIN_TRANSFORMERS = "5.24"  # the layers' and masks' ``cache`` argument (it was ``past_key_values`` before 5.24)


def check_transformers(version: str) -> None:
    """Refuse a ``transformers`` older than :data:`MIN_TRANSFORMERS` (the one ``pyproject.toml`` asks for), whose
    layer and mask functions take other arguments than :mod:`peer.backend` passes.

    :raises RuntimeError: naming the version found and the one needed
    """
    from packaging.version import Version

    if Version(version) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"transformers {version} is installed; this swarm needs transformers>={MIN_TRANSFORMERS} "
                           f"(pip install 'transformers>={MIN_TRANSFORMERS},<6')")


def _hub_download(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, unknown repo, gated model, missing file
        raise ModelSpecError(
            f"model {repo_id!r} is not a local directory, and {filename} could not be fetched from the "
            f"Hugging Face hub: {type(e).__name__}: {e}"
        ) from e


_SAMPLE_BYTES = 64 * 1024


def _open_shard(path: str):
    """``safe_open`` of a shard. :raises ModelSpecError: naming the file if it is truncated or not safetensors."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError, OSError
        raise ModelSpecError(f"cannot read safetensors file {path}: {e}") from e


def shard_fingerprint(path: str) -> bytes:
    """A cheap fingerprint of a safetensors shard: its size plus 64 KiB samples from the start of its data, the
    middle and the end (each read only once). Two shards of different training runs differ in it.

    :raises ModelSpecError: if the file cannot be read
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            parts = [str(size).encode()]
            head = f.read(8)
            data_start = 8 + int.from_bytes(head, "little") if len(head) == 8 else 0
            data_start = min(data_start, size)
            for offset in sorted({data_start, max(data_start, (data_start + size) // 2 - _SAMPLE_BYTES // 2),
                                  max(data_start, size - _SAMPLE_BYTES)}):
                f.seek(offset)
                parts.append(f.read(_SAMPLE_BYTES))
    except OSError as e:
        raise ModelSpecError(f"cannot read safetensors file {path}: {e}") from e
    return hashlib.sha256(b"\0".join(parts)).digest()


_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def looks_like_path(model: str) -> bool:
    """True if ``model`` can only name a local directory, not a hub id like ``org/name``."""
    return model.startswith((".", "~", os.path.sep)) or (os.path.sep in model and not _HUB_ID.match(model))


class Checkpoint:
    """A Hugging Face causal-LM checkpoint, by local path or hub id; shards are fetched only when read.

    :raises ModelSpecError: if the model is unknown, unreachable, has no safetensors weights, or is not one of
        :data:`SUPPORTED_FAMILIES`.
    """

    def __init__(self, model: str):
        self.name = model
        self.local_dir: Optional[str] = model if os.path.isdir(model) else None
        if self.local_dir is None and looks_like_path(model):
            raise ModelSpecError(f"model {model!r} is neither a local directory nor a hub id like 'org/name'")
        config_path = self._file("config.json")
        try:
            with open(config_path) as f:
                self.config_dict = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError
            raise ModelSpecError(f"cannot read {config_path}: {e}") from e
        if not isinstance(self.config_dict, dict):
            raise ModelSpecError(f"cannot read {config_path}: not a JSON object")
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.local_dir or model)
        except Exception as e:
            raise ModelSpecError(f"cannot read the config of {model!r} ({config_path}): {e}") from e
        if self.config.model_type not in SUPPORTED_FAMILIES:
            raise ModelSpecError(
                f"model type {self.config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if getattr(self.config, "sliding_window", None) and getattr(self.config, "use_sliding_window", True):
            layer_types = getattr(self.config, "layer_types", None) or []
            if any(t != "full_attention" for t in layer_types) or self.config.model_type == "mistral":
                raise ModelSpecError("sliding-window attention layers are not supported yet")
        self.config._attn_implementation = "sdpa"
        self._weight_map = self._read_weight_map()
        self._uid: Optional[str] = None

    def _file(self, filename: str) -> str:
        if self.local_dir is not None:
            path = os.path.join(self.local_dir, filename)
            if not os.path.exists(path):
                raise ModelSpecError(f"{filename} not found in {self.local_dir}")
            return path
        return _hub_download(self.name, filename)

    def _read_weight_map(self) -> Dict[str, str]:
        try:
            with open(self._file("model.safetensors.index.json")) as f:
                return dict(json.load(f)["weight_map"])
        except ModelSpecError:
            path = self._file("model.safetensors")
            with _open_shard(path) as f:
                return {name: "model.safetensors" for name in f.keys()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ModelSpecError(f"cannot read the shard index model.safetensors.index.json of {self.name}: "
                                 f"{type(e).__name__}: {e}") from e

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def model_uid(self) -> str:
        """A DHT-safe id shared by every peer and client of this checkpoint: a readable name plus a hash of
        the config and, for a local checkpoint, of a fingerprint of its weights (see :func:`shard_fingerprint`),
        so different models, or two checkpoints of one config with different weights, never mix in one swarm.
        A hub id's hash covers its config only (its shards are not fetched for the id); identical copies of a
        local checkpoint in folders of the same name get the same id.

        :raises ModelSpecError: if a local shard cannot be read
        """
        if self._uid is None:
            base = os.path.basename(os.path.normpath(self.name)) if self.local_dir else self.name.replace("/", "--")
            base = re.sub(r"[^A-Za-z0-9_.\-]", "-", base)[:80] or "model"
            h = hashlib.sha256(json.dumps(self.config_dict, sort_keys=True).encode())
            if self.local_dir is not None:
                for shard in sorted(set(self._weight_map.values())):
                    h.update(b"\0" + shard.encode() + b"\0" + shard_fingerprint(self._file(shard)))
            self._uid = f"{base}-{h.hexdigest()[:10]}"
        return self._uid

    def tensor_names(self, prefixes: Iterable[str]) -> List[str]:
        prefixes = tuple(prefixes)
        return [n for n in self._weight_map if n.startswith(prefixes)]

    def read_tensors(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Read only the named tensors, opening only the shards that hold them.

        :raises ModelSpecError: if a name is not in the checkpoint
        """
        by_shard: Dict[str, List[str]] = {}
        for name in names:
            if name not in self._weight_map:
                raise ModelSpecError(f"tensor {name} is not in checkpoint {self.name}")
            by_shard.setdefault(self._weight_map[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            path = self._file(shard)
            with _open_shard(path) as f:
                for name in shard_names:
                    try:
                        out[name] = f.get_tensor(name)
                    except Exception as e:  # SafetensorError: a truncated or corrupt shard
                        raise ModelSpecError(f"cannot read tensor {name} from {path}: {e}") from e
        return out

    def span_config(self, start: int, end: int):
        """A copy of the config that describes only blocks ``[start, end)`` (used to size a span's KV cache)."""
        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = end - start
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types)[start:end]
        return cfg


def resolve_dtype(dtype: str, config=None) -> torch.dtype:
    """``auto`` picks the checkpoint's dtype (float32 if it names none). :raises ValueError: unknown name."""
    if dtype == "auto":
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
        return DTYPES.get(name, torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_meta_model(config):
    """The full model on the meta device (no memory), to take block classes and tensor names from."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
