"""Saving and loading adapters: safetensors for tensors, JSON for everything else, never pickle.

An adapter directory holds `adapter.safetensors` (each adapter's own tensors, keyed `<module>.<tensor>`) and
`adapter_config.json` (format, method, config, targets, svdtune version, and per module its shape, which tensors
train, and the sha256 of the base weight it was built on). Loading checks that digest, so an adapter can only land
on the exact weights it was trained on; a mismatch is an error, not silently wrong outputs. Loading restores the
saved tensors as they are (no SVD is re-run), so outputs are bit-exact, residual methods included.

The directory is written whole (`atomic.write_directory`): a killed save leaves the previous adapter or the new one,
never new weights beside an old config. Its `manifest.json` (sizes and sha256 of both files, written last) is
verified on load, so a bit flip, a truncated copy or a hand-edited config is an error, not a silently different
model; so are tensors of the wrong shape, dtype or method for the config, NaN/Inf values, and a module list that
does not cover what the adapter's targets select.

This module is the only code that knows the format: everything else reads an adapter directory with `read_adapter`
(its config and tensors, verified) and writes one with `write_adapter` (SVF expert arithmetic, `svdtune info`, the
exports), so a new tensor or field travels through every tool unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .atomic import check_replaceable, manifest_problem, recover, write_directory
from .core import Adapter, weight_matrix
from .inject import (
    AdaptSummary,
    adapters,
    check_materialized,
    count_parameters,
    ensure_not_adapted,
    extra_trainable,
    grad_flags_restored_on_error,
    install,
    linear_modules,
    make_config,
)
from .linalg import Factorizer, ShapeFactorizer, default_cache_dir, tensor_digest
from .methods import get_method
from .patterns import search

FORMAT = "svdtune-adapter"
FORMAT_VERSION = 2  # 2: the directory carries a manifest (sizes + sha256), verified on load

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
OWN_FILES = frozenset({WEIGHTS_FILE, CONFIG_FILE})
EXTRA_PREFIX = "train_also/"  # tensors trained in full beside the adapters (a task head), keyed by parameter name


class AdapterFileError(ValueError):
    """An adapter directory is missing, incomplete, corrupt, or made for another base model."""


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """An adapter directory's contents: its config (`adapter_config.json`, parsed) and every tensor it holds, keyed
    as stored (`<module>.<tensor>`, and `train_also/<parameter>` for tensors trained in full)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapted module, by their name inside the adapter (`z`, `A`, `mask`, ...)."""
        return {key: self.tensors[f"{module}.{key}"] for key in self.meta["modules"][module]["tensors"]}

    def extra(self) -> dict[str, torch.Tensor]:
        """The tensors trained in full beside the adapters (a task head), by parameter name."""
        return {n: self.tensors[f"{EXTRA_PREFIX}{n}"] for n in self.meta.get("train_also", {})}


def base_fingerprint(digests: dict[str, str]) -> str:
    """One short id for the set of base weights an adapter sits on (shown by `svdtune info`)."""
    return hashlib.sha256("".join(f"{n}={d};" for n, d in sorted(digests.items())).encode()).hexdigest()[:16]


def save_adapter(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the model's adapters to directory `path` (created if needed); refuses to replace one unless asked."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no svdtune adapters; call svdtune.adapt(model, ...) first")
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
        "method": first.name, "config": dataclasses.asdict(first.config),
        "targets": summary.targets if isinstance(summary, AdaptSummary) else None,
        "trainable_parameters": sum(p.numel() for a in found.values() for p in a.parameters() if p.requires_grad),
        "base_fingerprint": base_fingerprint({n: m["base_sha256"] for n, m in modules.items()}),
        "modules": modules,
        "train_also": {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                       for n, p in extra.items()},
    }
    return write_adapter(path, AdapterFile(meta, tensors), overwrite=overwrite)


def write_adapter(path: str | os.PathLike, adapter: AdapterFile, *, overwrite: bool) -> Path:
    """Write an adapter directory (tensors + config + manifest) as a whole, replacing an existing adapter only with
    `overwrite`; other files the user keeps there are carried over. The config gets this svdtune's format stamp."""
    path = Path(path)
    _check_names(adapter.meta, adapter.tensors)  # what is written must read back
    tensors, meta = adapter.tensors, adapter.meta
    check_replaceable(path, overwrite=overwrite)
    stamp = {"format": FORMAT, "format_version": FORMAT_VERSION, "svdtune_version": __version__,
             "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps({**stamp, **{k: v for k, v in meta.items() if k not in stamp}}, indent=2) + "\n"

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(text)

    return write_directory(path, fill, own=OWN_FILES)


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
    version = meta.get("format_version", 1)
    if type(version) is not int or version < 1:
        raise AdapterFileError(f"{config_file}: format_version must be a positive integer, got {version!r}; the "
                               "file is damaged or was edited")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} was written by a newer svdtune ({meta.get('svdtune_version')}); upgrade "
                               f"svdtune to load it")
    for key, kind in (("method", str), ("config", dict), ("modules", dict)):
        if key not in meta:
            raise AdapterFileError(f"{config_file} lacks the field {key!r}; the file is damaged")
        if not isinstance(meta[key], kind):
            raise AdapterFileError(f"{config_file}: {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                                   f"got {json.dumps(meta[key])}; the file is damaged or was edited")
    if not meta["modules"]:
        raise AdapterFileError(f"{config_file} lists no modules; the file is damaged or was edited")
    for name, info in meta["modules"].items():
        if not (isinstance(info, dict) and _is_shape(info.get("shape"), 2) and isinstance(info.get("tensors"), list)
                and isinstance(info.get("trainable"), list) and isinstance(info.get("base_sha256"), str)):
            raise AdapterFileError(f"{config_file}: the entry of module {name} is incomplete (it needs shape, "
                                   "tensors, trainable, base_sha256); the file is damaged or was edited")
    if not isinstance(meta.get("train_also", {}), dict):
        raise AdapterFileError(f"{config_file}: 'train_also' must be a JSON object; the file is damaged")
    return meta


def _is_shape(value: Any, dims: int | None = None) -> bool:
    return (isinstance(value, list) and (dims is None or len(value) == dims)
            and all(type(d) is int and d >= 0 for d in value))


def verify_files(path: str | os.PathLike) -> None:
    """Check an adapter directory against its manifest (format 2 and later); older adapters have none."""
    path = Path(path)
    if read_adapter_config(path).get("format_version", 1) < 2:
        return
    problem = manifest_problem(path)
    if problem is not None:
        raise AdapterFileError(f"{path} does not hold the adapter that was saved there: {problem}. Its files were "
                               "damaged, edited by hand, or mixed with another adapter's; save it again from the "
                               "model, or restore a copy")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{weights} is missing; the adapter directory is incomplete")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} is truncated or corrupt ({e}); save the adapter again") from None


def saved_bytes(model: nn.Module) -> int:
    """The size of the adapter file `save_adapter` writes for `model` (what a user stores or ships per adapter)."""
    with tempfile.TemporaryDirectory() as tmp:
        return (save_adapter(model, Path(tmp) / "adapter") / WEIGHTS_FILE).stat().st_size


def holds_adapter(path: str | os.PathLike) -> bool:
    """Whether directory `path` holds an svdtune adapter (so writing something else there would destroy it)."""
    return (Path(path) / WEIGHTS_FILE).is_file()  # a PEFT export has an adapter_config.json too, not this file


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """The config and tensors of the adapter directory `path`, checked against each other and the manifest (a save
    killed half-way is finished or undone first, where the directory is writable)."""
    path = Path(path)
    with contextlib.suppress(OSError):  # finishing a killed save needs write access; a read-only copy loads as is
        recover(path)
    meta = read_adapter_config(path)
    verify_files(path)
    tensors = _read_tensors(path)
    _check_names(meta, tensors)
    return AdapterFile(meta, tensors)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Put the adapter saved at `path` into `model` (a freshly loaded base), in place; returns the model.

    With `check_base` (the default) every target weight must be bit-identical to the one the adapter was built on.
    Everything is checked before the model changes: the files against their manifest, every tensor against what the
    method makes for the saved config (names, shapes, dtypes, finite values), the modules against the targets.
    """
    saved = read_adapter(path)
    meta, tensors = saved.meta, saved.tensors
    cls = get_method(meta["method"])
    config = make_config(cls, meta["config"])
    ensure_not_adapted(model)
    extra = _check_extra(model, meta.get("train_also", {}), tensors)
    layers = {name: _target_layer(model, name, info, check_base) for name, info in meta["modules"].items()}
    _check_coverage(model, meta)
    strict = meta.get("format_version", 1) >= 2
    built: dict[str, Adapter] = {}
    factors = Factorizer(default_cache_dir())  # one cache front for the buffers some methods recompute (SVF's U, V)
    with grad_flags_restored_on_error(layers.values()):
        for name, info in meta["modules"].items():
            own_config = make_config(cls, info["config"]) if "config" in info else config
            W = weight_matrix(layers[name])
            own = saved.module_tensors(name)
            _check_tensors(name, cls, own_config, W, own, strict=strict)
            own = {key: t.to(W.device) for key, t in own.items()}
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


def _check_names(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The weights file holds exactly the tensors the config lists: none missing, none unaccounted for."""
    listed = {f"{name}.{key}" for name, info in meta["modules"].items() for key in info["tensors"]}
    listed |= {f"{EXTRA_PREFIX}{n}" for n in meta.get("train_also", {})}
    missing, unlisted = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
    if missing or unlisted:
        what = (f"lacks {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unlisted else "") + \
               (f"holds tensors the config does not list ({', '.join(unlisted[:3])})" if unlisted else "")
        raise AdapterFileError(f"{WEIGHTS_FILE} {what}: the adapter files do not belong together")


def _check_coverage(model: nn.Module, meta: dict[str, Any]) -> None:
    """Every layer the adapter's `targets` select in this model has an adapter in the file (none was dropped)."""
    targets = meta.get("targets")
    if not isinstance(targets, str) or not targets:
        return
    selected = {n for n in linear_modules(model) if search(targets, n)}
    missing = sorted(selected - set(meta["modules"]))
    if missing:
        raise AdapterFileError(f"the adapter's targets {targets!r} select {len(selected)} layers of this model, but "
                               f"it holds no adapter for {len(missing)} of them ({', '.join(missing[:3])}): its "
                               "config is incomplete or was edited; save the adapter again")


def _check_tensors(name: str, cls: type[Adapter], config: Any, W: torch.Tensor, own: dict[str, torch.Tensor], *,
                   strict: bool) -> None:
    """Saved tensors of one module against what `cls` makes for `config` on W: names, shapes, dtypes, finiteness."""
    for key, t in own.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise AdapterFileError(f"{name}.{key} holds NaN/Inf values: the adapter was saved from a diverged model "
                                   "or is damaged; retrain with a lower learning rate or use an earlier adapter")
    expected = expected_tensors(cls, config, W)
    if expected is None:  # this method's init cannot run shape-only; restore still checks what it uses
        return
    if set(own) != set(expected):
        raise AdapterFileError(f"{name}: the adapter holds {', '.join(sorted(own))}, but a {cls.name} adapter has "
                               f"{', '.join(sorted(expected))}: its method or config does not match its tensors")
    for key, t in own.items():
        shape, dtype = expected[key]
        if tuple(t.shape) != shape or not _dtype_fits(t.dtype, dtype, W.dtype, strict):
            raise AdapterFileError(
                f"{name}.{key} is {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}, but a {cls.name} adapter "
                f"with this config on a {W.shape[0]}x{W.shape[1]} {str(W.dtype).removeprefix('torch.')} weight has "
                f"{shape} {str(dtype).removeprefix('torch.')}: the tensors do not match the config (was it edited?)")


def expected_tensors(cls: type[Adapter], config: Any, W: torch.Tensor) -> dict[str, tuple[tuple, torch.dtype]] | None:
    """Name -> (shape, dtype) of the tensors `cls` makes with `config` for weight W, found on the meta device (no
    computation); None if this method's init needs real values."""
    stand_in = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta", dtype=W.dtype)
    try:
        adapter = cls(stand_in, config, ShapeFactorizer())
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    return {key: (tuple(t.shape), t.dtype) for key, t in adapter.adapter_tensors().items()}


def _dtype_fits(saved: torch.dtype, expected: torch.dtype, base: torch.dtype, strict: bool) -> bool:
    """Same kind (float, integer, bool); a float may be narrower than svdtune makes only when it is the base's own
    dtype (the convention of older adapters and PEFT imports), never narrower than both (fp16 on a float32 base)."""
    if saved == expected:
        return True
    if saved.is_floating_point != expected.is_floating_point or (saved == torch.bool) != (expected == torch.bool):
        return False
    if not saved.is_floating_point:
        return not strict
    wide = torch.finfo(saved).bits >= torch.finfo(expected).bits
    return wide or saved == base


def _target_layer(model: nn.Module, name: str, info: dict[str, Any], check_base: bool) -> nn.Module:
    """The layer an adapter entry targets, checked to be the same shape and (with check_base) the same weights."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise AdapterFileError(f"the adapter targets {name}, which this model does not have: it was made for "
                               "another architecture") from None
    W = weight_matrix(layer)
    try:
        check_materialized(W)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
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
        shape = info.get("shape") if isinstance(info, dict) else None
        if not _is_shape(shape):
            raise AdapterFileError(f"the train_also entry of {name} has no valid shape; the config is damaged")
        if name not in params or list(params[name].shape) != shape:
            raise AdapterFileError(f"the adapter carries a trained {name} of shape {tuple(shape)}, which this "
                                   "model does not have (load the model with the same head, e.g. num_labels)")
        saved = tensors.get(f"{EXTRA_PREFIX}{name}")
        if saved is None:
            raise AdapterFileError(f"{WEIGHTS_FILE} lacks {name}; the adapter files do not belong together")
        if list(saved.shape) != shape or not saved.is_floating_point() or not torch.isfinite(saved).all():
            raise AdapterFileError(f"{WEIGHTS_FILE}: the saved {name} is {tuple(saved.shape)} {saved.dtype}, not a "
                                   f"finite float tensor of shape {tuple(shape)}; the adapter is damaged")
    return {name: params[name] for name in listed}
