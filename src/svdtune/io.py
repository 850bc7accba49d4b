"""Saving and loading adapters: safetensors for tensors, JSON for everything else, never pickle.

An adapter directory holds `adapter.safetensors` (each adapter's own tensors, keyed `<module>.<tensor>`) and
`adapter_config.json` (format, method, config, targets, svdtune version, and per module its shape, which tensors
train, and the sha256 of the base weight it was built on). Loading checks that digest, so an adapter can only land
on the exact weights it was trained on; a mismatch is an error, not silently wrong outputs. Loading restores the
saved tensors as they are (no SVD is re-run), so outputs are bit-exact, residual methods included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .core import Adapter, weight_matrix
from .inject import (AdaptSummary, adapters, count_parameters, ensure_not_adapted, extra_trainable,
                     grad_flags_restored_on_error, install, make_config)
from .linalg import Factorizer, default_cache_dir, tensor_digest
from .paths import write_atomic
from .methods import get_method

FORMAT = "svdtune-adapter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
EXTRA_PREFIX = "train_also/"  # tensors trained in full beside the adapters (a task head), keyed by parameter name


class AdapterFileError(ValueError):
    """An adapter directory is missing, incomplete, corrupt, or made for another base model."""


def base_fingerprint(digests: dict[str, str]) -> str:
    """One short id for the set of base weights an adapter sits on (shown by `svdtune info`)."""
    return hashlib.sha256("".join(f"{n}={d};" for n, d in sorted(digests.items())).encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's adapters to directory `path` (created if needed); refuses to replace one unless asked."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no svdtune adapters; call svdtune.adapt(model, ...) first")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True to replace the adapter "
                              "files in it, or choose another path")
    first = next(iter(found.values()))
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, adapter in found.items():
        own = adapter.adapter_tensors()
        tensors.update({f"{name}.{key}": t.detach().contiguous() for key, t in own.items()})
        W = weight_matrix(adapter.base)
        modules[name] = {"shape": list(adapter.shape), "base_dtype": str(W.dtype).removeprefix("torch."),
                         "base_sha256": tensor_digest(W), "trainable": adapter.trainable_names(),
                         "tensors": sorted(own)}
        if adapter.config != first.config:  # per-module ranks (an imported PEFT rank_pattern, say)
            modules[name]["config"] = dataclasses.asdict(adapter.config)
    extra = extra_trainable(model)
    tensors.update({f"{EXTRA_PREFIX}{n}": p.detach().contiguous() for n, p in extra.items()})
    summary = getattr(model, "svdtune_summary", None)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "svdtune_version": __version__,
        "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": first.name, "config": dataclasses.asdict(first.config),
        "targets": summary.targets if isinstance(summary, AdaptSummary) else None,
        "trainable_parameters": sum(p.numel() for a in found.values() for p in a.parameters() if p.requires_grad),
        "base_fingerprint": base_fingerprint({n: m["base_sha256"] for n, m in modules.items()}),
        "modules": modules,
        "train_also": {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                       for n, p in extra.items()},
    }
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `adapter_config.json` of an adapter directory, validated enough to be trusted by callers."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterFileError(f"no svdtune adapter at {path}: {CONFIG_FILE} is missing "
                               f"(an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_file} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{config_file} is not an svdtune adapter config (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{path} was written by a newer svdtune ({meta.get('svdtune_version')}); upgrade "
                               f"svdtune to load it")
    for key in ("method", "config", "modules"):
        if key not in meta:
            raise AdapterFileError(f"{config_file} lacks the field {key!r}; the file is damaged")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{weights} is missing; the adapter directory is incomplete")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} is truncated or corrupt ({e}); save the adapter again") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Put the adapter saved at `path` into `model` (a freshly loaded base), in place; returns the model.

    With `check_base` (the default) every target weight must be bit-identical to the one the adapter was built on.
    """
    path = Path(path)
    meta = read_adapter_config(path)
    cls = get_method(meta["method"])
    config = make_config(cls, meta["config"])
    ensure_not_adapted(model)
    tensors = _read_tensors(path)
    extra = _check_extra(model, meta.get("train_also", {}), tensors)
    layers = {name: _target_layer(model, name, info, check_base) for name, info in meta["modules"].items()}
    built: dict[str, Adapter] = {}
    factors = Factorizer(default_cache_dir())  # one cache front for the buffers some methods recompute (SVF's U, V)
    with grad_flags_restored_on_error(layers.values()):
        for name, info in meta["modules"].items():
            own = {}
            for key in info["tensors"]:
                if f"{name}.{key}" not in tensors:
                    raise AdapterFileError(f"{WEIGHTS_FILE} lacks {name}.{key}; the adapter files do not belong "
                                           "together")
                own[key] = tensors[f"{name}.{key}"].to(weight_matrix(layers[name]).device)
            own_config = make_config(cls, info["config"]) if "config" in info else config
            built[name] = cls.restore(layers[name], own_config, own, set(info["trainable"]), factors)
    with torch.no_grad():
        for n, p in extra.items():
            p.copy_(tensors[f"{EXTRA_PREFIX}{n}"])
    install(model, built, extra)
    trainable, total = count_parameters(model)
    model.svdtune_summary = AdaptSummary(method=cls.name, config=meta["config"], targets=meta.get("targets") or "",
                                         modules=list(built), trainable=trainable, total=total,
                                         train_also=sum(p.numel() for p in extra.values()))
    return model


def _target_layer(model: nn.Module, name: str, info: dict[str, Any], check_base: bool) -> nn.Module:
    """The layer an adapter entry targets, checked to be the same shape and (with check_base) the same weights."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise AdapterFileError(f"the adapter targets {name}, which this model does not have: it was made for "
                               "another architecture") from None
    W = weight_matrix(layer)
    if list(W.shape) != info["shape"]:
        raise AdapterFileError(f"{name} is {tuple(W.shape)} here but {tuple(info['shape'])} in the adapter: it "
                               "was made for another base model")
    if check_base and tensor_digest(W) != info["base_sha256"]:
        raise AdapterFileError(
            f"the weight of {name} differs from the one the adapter was built on (the adapter's base was "
            f"{info['base_dtype']}, this one is {str(W.dtype).removeprefix('torch.')}): load the same base model "
            "in the same dtype, or pass check_base=False if you know the difference is harmless")
    return layer


def _check_extra(model: nn.Module, listed: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's parameters for the adapter's full-trained tensors (train_also), checked before anything changes."""
    params = dict(model.named_parameters())
    for name, info in listed.items():
        if name not in params or list(params[name].shape) != info["shape"]:
            raise AdapterFileError(f"the adapter carries a trained {name} of shape {tuple(info['shape'])}, which this "
                                   "model does not have (load the model with the same head, e.g. num_labels)")
        if f"{EXTRA_PREFIX}{name}" not in tensors:
            raise AdapterFileError(f"{WEIGHTS_FILE} lacks {name}; the adapter files do not belong together")
    return {name: params[name] for name in listed}
