"""Hugging Face ``transformers`` (and ``sentence-transformers``): models saved
with their config as transformers does, and their weights as DTDR::

    from transformers import AutoModel
    from torch_dtdr.integrations import transformers as dtdr_hf

    dtdr_hf.save_pretrained(model, "out/", codec="dtdr", max_shard_size="2GB")
    model = dtdr_hf.from_pretrained(AutoModel, "out/")

Folder layout (the safetensors names with ``.dtdr``)::

    config.json, generation_config.json (models that generate)
    model.dtdr                                   one file, or shards:
    model-00001-of-00003.dtdr ... + model.dtdr.index.json
        {"metadata": {"total_size": BYTES, "format": "dtdr"},
         "weight_map": {"encoder.layer.0.attention.self.query.weight": "model-00001-of-00003.dtdr", ...}}

Each tensor is stored under its ``state_dict`` name; tied parameters are kept
in one shard and stored once. :func:`torch_dtdr.convert` turns such a
``model.dtdr`` into ``model.safetensors`` and back, and :func:`from_pretrained`
also reads a folder whose weights were converted from a transformers
checkpoint with ``torch_dtdr.convert(folder, folder/"model.dtdr")``.
:func:`from_pretrained` builds the model from the config and decodes each
tensor straight into the model's own parameters (:func:`torch_dtdr.load_model`),
so the weights are never held twice.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import torch

from .. import storage
from ..api import save
from ..errors import CheckpointNotFoundError, FormatError
from ..modules import load_model

__all__ = ["save_pretrained", "from_pretrained", "save_sentence_transformer", "load_sentence_transformer",
           "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME"]

WEIGHTS_NAME = "model.dtdr"
WEIGHTS_INDEX_NAME = "model.dtdr.index.json"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _shard_limit(max_shard_size) -> int:
    if isinstance(max_shard_size, int):
        return max_shard_size
    text = str(max_shard_size).strip().upper()
    for unit, factor in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` in order into shards of at most ``limit`` bytes (a
    tensor larger than that gets a shard of its own); tensors sharing storage
    stay together."""
    groups: dict[tuple, list[str]] = {}
    order: list[tuple] = []
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() else ("empty", name)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(name)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in order:
        names = groups[key]
        nbytes = max(state[n].numel() * state[n].element_size() for n in names)
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        for n in names:
            shards[-1][n] = state[n]
        size += nbytes
    return shards


def save_pretrained(model, directory, *, codec="dtdr", parity="default", max_shard_size="5GB",
                    state_dict: dict | None = None, **save_kwargs) -> list[str]:
    """Write ``model``'s config (and generation config) with transformers'
    own ``save_pretrained`` of the config, and its weights as DTDR, sharded by
    ``max_shard_size`` ("5GB", "500MB", or bytes) with an index when more than
    one shard is needed. ``codec``, ``parity`` and ``save_kwargs`` go to
    :func:`torch_dtdr.save`. Returns the weight files written. Local folders only."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    can_generate = getattr(model, "can_generate", lambda: False)
    if can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    state = dict(state_dict if state_dict is not None else model.state_dict())
    shards = _shards(state, _shard_limit(max_shard_size))
    for stale in os.listdir(directory):  # weights of an earlier save with another shard count
        if stale == WEIGHTS_INDEX_NAME or (stale.startswith("model") and stale.endswith(".dtdr")):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.dtdr" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save(shard, os.path.join(directory, name), codec=codec, parity=parity,
             metadata={"format": "pt", "torch_dtdr.hf": "1"}, **save_kwargs)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total, "format": "dtdr"},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        storage.write_bytes_atomic(os.path.join(directory, WEIGHTS_INDEX_NAME),
                                   json.dumps(index, indent=2, sort_keys=True).encode("utf-8"))
    return [os.path.join(directory, n) for n in names]


def weight_files(directory) -> list[str]:
    """The DTDR weight files of a folder: the index's shards, ``model.dtdr``, or
    the one ``*.dtdr`` file a conversion left there."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.exists(index_path):
        index = json.loads(storage.read_text(index_path))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise FormatError("the index has no weight_map", file=index_path)
        files = []
        for shard in weight_map.values():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard.endswith(".dtdr"):
                raise FormatError(f"bad shard name {shard!r} in the index", file=index_path)
            if shard not in files:
                files.append(shard)
        return [os.path.join(directory, f) for f in files]
    if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        return [os.path.join(directory, WEIGHTS_NAME)]
    found = sorted(n for n in os.listdir(directory) if n.endswith(".dtdr")) if os.path.isdir(directory) else []
    if len(found) == 1:
        return [os.path.join(directory, found[0])]
    raise CheckpointNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} here"
                                  + (f" (several .dtdr files: {found})" if found else ""), file=directory)


def _ignorable(model: torch.nn.Module, name: str) -> bool:
    """A stored name the model does not load, as transformers skips it: a
    non-persistent buffer (``position_ids`` in older BERT checkpoints) or a
    pattern in the model's ``_keys_to_ignore_on_load_unexpected``."""
    if name in dict(model.named_buffers()):
        return True
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return any(re.search(pattern, name) for pattern in patterns)


def load_weights(model: torch.nn.Module, directory, *, strict: bool = True, errors: str = "strict"):
    """Decode a folder's DTDR weights into ``model`` in place; returns
    ``(missing, unexpected)`` over all shards (tied parameters count as
    loaded through any of their names)."""
    files = weight_files(directory)
    expected = list(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in files:
        missing_here, unexpected_here = load_model(model, path, strict=False, errors=errors)
        missing_set = set(missing_here)
        loaded.update(k for k in expected if k not in missing_set)
        unexpected.extend(unexpected_here)
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in unexpected if not _ignorable(model, k)]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading the weights of {type(model).__name__} from {directory}: "
                           f"missing {missing}, unexpected {unexpected}")
    return missing, unexpected


def from_pretrained(model_class, directory, *, torch_dtype: torch.dtype | None = None, strict: bool = True,
                    errors: str = "strict", config=None, **config_kwargs) -> Any:
    """Build ``model_class`` (a model class such as ``BertModel``, or an Auto
    class such as ``AutoModel``) from the folder's config, decode the DTDR
    weights into it in place, and return it in eval mode (as transformers
    does). ``errors="strict"`` refuses weights that are not bit-exact after
    parity repair; ``"recover"`` degrades damaged regions gracefully with a
    warning. ``torch_dtype`` converts the model before loading."""
    from transformers import AutoConfig

    directory = os.fspath(directory)
    if config is None:
        config = AutoConfig.from_pretrained(directory, **config_kwargs)
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        model = model_class(config)
    else:  # an Auto class
        model = model_class.from_config(config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    load_weights(model, directory, strict=strict, errors=errors)
    model.eval()
    return model


def _transformer_modules(st_directory: str) -> list[tuple[int, str]]:
    """``(position, folder)`` of each Transformer module listed in modules.json."""
    modules = json.loads(storage.read_text(os.path.join(st_directory, "modules.json")))
    if not isinstance(modules, list):
        raise FormatError("modules.json is not a list", file=st_directory)
    found = []
    for position, module in enumerate(modules):
        kind = module.get("type", "") if isinstance(module, dict) else ""
        path = module.get("path", "") if isinstance(module, dict) else ""
        if not isinstance(path, str) or os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
            raise FormatError(f"bad module path {path!r} in modules.json", file=st_directory)
        if isinstance(kind, str) and kind.rsplit(".", 1)[-1] == "Transformer":
            found.append((position, path))
    return found


def _hf_model(module):
    model = getattr(module, "auto_model", None)
    return model if model is not None else module.model


def save_sentence_transformer(st_model, directory, *, codec="dtdr", parity="default", **save_kwargs) -> None:
    """Save a ``SentenceTransformer`` as its own ``save`` does (modules,
    tokenizer, pooling config), with each Transformer module's weights as
    DTDR (see :func:`save_pretrained`) instead of safetensors."""
    directory = os.fspath(directory)
    st_model.save(directory)
    for position, folder in _transformer_modules(directory):
        target = os.path.join(directory, folder)
        for name in os.listdir(target):
            if name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                os.remove(os.path.join(target, name))
        save_pretrained(_hf_model(st_model[position]), target, codec=codec, parity=parity, **save_kwargs)


def load_sentence_transformer(directory, *, errors: str = "strict", **st_kwargs):
    """Load a folder written by :func:`save_sentence_transformer`. The model is
    built from a mirror of the folder (links to its files) whose Transformer
    weights are an empty safetensors file, so transformers allocates the
    model once without weights to read; the DTDR weights are then decoded
    into it in place. ``st_kwargs`` go to ``SentenceTransformer`` (``device``...)."""
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer

    import transformers

    directory = os.fspath(directory)
    transformers_at = _transformer_modules(directory)
    with tempfile.TemporaryDirectory() as mirror:
        for root, _dirs, files in os.walk(directory):
            rel = os.path.relpath(root, directory)
            os.makedirs(os.path.join(mirror, rel), exist_ok=True)
            for name in files:
                if not name.endswith(".dtdr") and name != WEIGHTS_INDEX_NAME:
                    os.symlink(os.path.join(root, name), os.path.join(mirror, rel, name))
        for _position, folder in transformers_at:
            save_file({}, os.path.join(mirror, folder, "model.safetensors"))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "weights newly initialized": they are loaded next
        try:
            st_kwargs.setdefault("local_files_only", True)
            model = SentenceTransformer(mirror, **st_kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        for position, folder in transformers_at:
            load_weights(_hf_model(model[position]), os.path.join(directory, folder), errors=errors)
    model.eval()
    return model
