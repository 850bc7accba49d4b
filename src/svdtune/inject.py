"""Putting adapters into a model and taking them out: adapt, merge, unload, disabled.

The model stays an ordinary `nn.Module` (HF `Trainer`, accelerate, DDP/FSDP, `generate()` keep working): each target
linear layer is replaced in its parent by an `Adapter` that owns it, and every other parameter is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .core import Adapter, is_linear, weight_matrix
from .linalg import Factorizer, default_cache_dir
from .methods import get_method
from .patterns import search

# Default targets by architecture family, tried in order; the first that matches any linear layer wins.
DEFAULT_TARGETS: dict[str, str] = {
    "llama-style (q,k,v,o,gate,up,down projections)": r"(^|\.)(q|k|v|o|gate|up|down)_proj$",
    "bert-style (query, key, value and the dense layers)": r"(^|\.)encoder\.layer\.\d+\..*\b(query|key|value|dense)$",
    "gpt2-style (c_attn, c_proj, c_fc)": r"(^|\.)(c_attn|c_proj|c_fc)$",
}

# Named target sets usable as `targets=`. "mlp-only" is the Transformers² setting for SVF (arXiv 2501.06252): the
# feed-forward matrices only (llama gate/up/down, GPT-2 mlp.c_fc/c_proj, BERT intermediate and output dense).
TARGET_PRESETS: dict[str, str] = {
    "mlp-only": (r"(^|\.)(mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj)"
                 r"|encoder\.layer\.\d+\.(intermediate|output)\.dense)$"),
}


@dataclass
class AdaptSummary:
    """What `adapt` did: printed after adapting, kept on the model as `model.svdtune_summary`."""

    method: str
    config: dict[str, Any]
    targets: str
    modules: list[str]
    trainable: int
    total: int
    factor_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    seconds: float = 0.0
    train_also: int = 0  # parameters trained in full beside the adapters (train_also), included in `trainable`

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        line = (f"svdtune: {self.method} on {len(self.modules)} modules, trainable {self.trainable:,} / "
                f"{self.total:,} parameters ({pct:.3f}%)")
        if self.train_also:
            line += f" including {self.train_also:,} in train_also"
        if self.cache_hits or self.cache_misses:
            line += (f", SVD/QR {self.factor_seconds:.2f} s (cache: {self.cache_hits} hits, "
                     f"{self.cache_misses} computed)")
        return line + f", {self.seconds:.2f} s in all"


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Adapter)}


def split_name(name: str) -> tuple[str, int | None]:
    """A module's kind and layer index: 'model.layers.3.self_attn.q_proj' -> ('self_attn.q_proj', 3)."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (match.group(2), int(match.group(1))) if match else (name, None)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable (linear) layer by module name, skipping layers already inside an adapter."""
    inside = {f"{name}.base" for name in adapters(model)}
    return {name: m for name, m in model.named_modules() if is_linear(m) and name not in inside}


def names_pattern(names: Sequence[str]) -> str:
    """PEFT's `target_modules` list as one regex: a module matches when its name is one of `names` or ends with
    "." + one of them ("q_proj" matches "model.layers.0.self_attn.q_proj", not "model.layers.0.q_proj_extra")."""
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"targets as a list must hold module names (non-empty strings), got {list(names)!r}")
    return r"(^|\.)(" + "|".join(re.escape(n) for n in names) + r")$"


def resolve_targets(model: nn.Module, targets: str | Sequence[str] | None) -> tuple[str, dict[str, nn.Module]]:
    """The target regex (given, built from a list of names, or the architecture default) and the linear layers it
    matches (`re.search`)."""
    linear = linear_modules(model)
    sample = ", ".join(list(linear)[:8]) or "(the model has no nn.Linear/Conv1D layers)"
    if targets is None:
        for pattern in DEFAULT_TARGETS.values():
            matched = {n: m for n, m in linear.items() if re.search(pattern, n)}
            if matched:
                return pattern, matched
        raise ValueError("no default targets for this architecture; pass targets=<regex on module names>. "
                         f"Some linear layers: {sample}")
    if not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)):
            raise TypeError(f"targets must be a regex, a preset name or a list of module names, got "
                            f"{type(targets).__name__}")
        targets = names_pattern(targets)
    targets = TARGET_PRESETS.get(targets, targets)
    matched = {n: m for n, m in linear.items() if search(targets, n)}
    if not matched:
        raise ValueError(f"targets={targets!r} matches no linear layer. Some linear layers: {sample}")
    return targets, matched


def make_config(cls: type[Adapter], options: dict[str, Any]) -> Any:
    """Build a method's Config from keyword options; unknown names are an error listing the valid ones."""
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{cls.name} has no option {', '.join(unknown)}; its options are: {', '.join(sorted(known))}")
    for key, value in options.items():  # inf or NaN passes every "> 0" check and poisons the outputs at init
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{cls.name} option {key}={value} is not a finite number")
    return cls.Config(**options)


def check_materialized(W: torch.Tensor) -> None:
    """A weight on the meta device has a shape but no values: nothing can be factorised, hashed or merged."""
    if W.is_meta:
        raise ValueError("the weight is on the meta device (the model was built without loading its weights); load "
                         "the model with its weights, e.g. from_pretrained without device_map='meta' or "
                         "init_empty_weights")


def check_finite(W: torch.Tensor) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"the weight has {bad} NaN/Inf entries; an SVD of it would be garbage. "
                         "Load a healthy checkpoint, or exclude this module with targets=...")


def ensure_not_adapted(model: nn.Module) -> None:
    existing = adapters(model)
    if existing:
        first = next(iter(existing.values()))
        raise ValueError(f"the model already has {len(existing)} {first.name} adapters; call svdtune.merge(model) "
                         "to keep them or svdtune.unload(model) to drop them before adapting again")


@contextlib.contextmanager
def grad_flags_restored_on_error(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Adapters freeze their base layer when built; if building fails part way, give the layers their flags back,
    so a failed adapt or load leaves the model exactly as it was."""
    flags = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    try:
        yield
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise


def install(model: nn.Module, built: dict[str, Adapter], extra: dict[str, nn.Parameter] | None = None) -> None:
    """Freeze every parameter of the model, swap each target layer for its (trainable) adapter, and unfreeze the
    `extra` parameters (a task head, say), which are then saved with the adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, adapter in built.items():
        replace_module(model, name, adapter)
    for p in (extra or {}).values():
        p.requires_grad_(True)


def extra_matches(model: nn.Module, train_also: str | None) -> dict[str, nn.Parameter]:
    """The parameters `train_also` selects; a pattern that selects none is an error showing some names."""
    if train_also is None:
        return {}
    named = dict(model.named_parameters())
    matched = {n: p for n, p in named.items() if search(train_also, n, "train_also")}
    if not matched:
        raise ValueError(f"train_also={train_also!r} matches no parameter. Some parameter names: "
                         f"{', '.join(list(named)[-6:])}")
    return matched


def extra_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the adapters (those `train_also` unfroze), by name."""
    inside = tuple(f"{name}." for name in adapters(model))
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(inside)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once even when tied."""
    seen = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in seen if p.requires_grad), sum(p.numel() for p in seen)


def adapt(model: nn.Module, method: str, *, targets: str | Sequence[str] | None = None,
          train_also: str | None = None, cache: bool | str | os.PathLike = True, progress: bool | None = None,
          verbose: bool = True, **options: Any) -> nn.Module:
    """Wrap every target linear layer of `model` in a `method` adapter, in place, and freeze everything else.

    `targets` is a regex searched in module names (None: the architecture's default, see DEFAULT_TARGETS), a
    preset name from TARGET_PRESETS ("mlp-only"), or a list of module names as PEFT's `target_modules`
    (["q_proj", "v_proj"]: names equal to, or ending in ".q_proj", ".v_proj").
    `train_also` is a regex on parameter names left trainable in full, e.g. "classifier" for a new task head; they
    are saved with the adapter (PEFT calls them modules_to_save).
    `cache` True uses the on-disk SVD/QR cache (`$SVDTUNE_CACHE_DIR`), a path uses that directory, False none.
    `progress` draws a bar over the layers (None: when there are 32 or more); `verbose` prints the summary.
    `options` are the method's Config fields (e.g. r=8, alpha=16). Returns the same model, for one-line use.
    """
    start = time.perf_counter()
    cls = get_method(method)
    config = make_config(cls, options)
    ensure_not_adapted(model)
    pattern, matched = resolve_targets(model, targets)
    extra = extra_matches(model, train_also)  # checked before any SVD
    clash = [n for n in extra if n.rpartition(".")[0] in matched]
    if clash:
        raise ValueError(f"train_also={train_also!r} selects weights of adapted layers ({', '.join(clash[:3])}); "
                         "they stay frozen under their adapters: narrow train_also or targets")
    factors = Factorizer(None if cache is False else default_cache_dir() if cache is True else cache)
    built: dict[str, Adapter] = {}
    show_progress = progress if progress is not None else len(matched) >= 32
    bar = tqdm(matched.items(), desc=f"svdtune {method}", unit="layer", disable=not show_progress)
    with grad_flags_restored_on_error(matched.values()):  # build all before touching the model
        for name, layer in bar:
            try:
                check_materialized(weight_matrix(layer))
                check_finite(weight_matrix(layer))
                built[name] = cls(layer, config, factors)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    install(model, built, extra)
    trainable, total = count_parameters(model)
    model.svdtune_summary = AdaptSummary(
        method=method, config=dataclasses.asdict(config), targets=pattern, modules=list(built), trainable=trainable,
        total=total, factor_seconds=factors.seconds, cache_hits=factors.hits, cache_misses=factors.misses,
        seconds=time.perf_counter() - start, train_also=sum(p.numel() for p in extra.values()))
    if verbose:
        print(model.svdtune_summary)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's ΔW into its base weight and put the plain layer back: zero inference overhead.

    Idempotent: a model without adapters is returned unchanged.
    """
    for name, adapter in adapters(model).items():
        untie(model, adapter.base)
        replace_module(model, name, adapter.merged_base())
    _drop_summary(model)
    return model


def untie(model: nn.Module, layer: nn.Module) -> None:
    """Give `layer` its own copy of a weight it shares with another module (an output layer tied to the input
    embedding), so merging ΔW into it leaves the other module as it was; the model's config stops tying them, so
    a saved and reloaded model keeps them apart too."""
    shared = sum(p is layer.weight for _, p in model.named_parameters(remove_duplicate=False))
    if shared < 2:
        return
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the untouched original layer back (exact: base weights are never edited)."""
    for name, adapter in adapters(model).items():
        replace_module(model, name, adapter.base)
    _drop_summary(model)
    return model


def _drop_summary(model: nn.Module) -> None:
    if "svdtune_summary" in vars(model):
        del model.svdtune_summary


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every adapter passes its input to the frozen layer only."""
    found = list(adapters(model).values())
    before = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for a, was in zip(found, before):
            a.enabled = was
