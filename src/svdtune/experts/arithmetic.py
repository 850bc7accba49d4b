"""SVF experts: add, subtract and interpolate SVF adapters trained on the same base, and swap them in place.

An SVF adapter is one vector per adapted matrix, all acting on the same singular basis (U, V) of the same frozen
weights, which is what makes experts composable (Transformers², arXiv 2501.06252, §3). Arithmetic happens on the
scales z, as in the paper (z' = Σ_k α_k z_k), whatever the parametrisation:

* `direct` (z trained from 1): on the offsets z − 1, since z = 1 is the base model: a weighted sum of experts is
  1 + Σ_k α_k (z_k − 1). "A + B" stacks both changes, "A − B" removes B's, and weights that sum to 1 give the
  paper's interpolation Σ_k α_k z_k (α = 0 or 1 returns an expert).
* `sigmoid` (z = sigmoid(θ), always with the nuclear-norm rescale c = Σσ / Σ(σ⊙z)): z' = Σ_k α_k z_k on the z
  themselves, then stored as θ' = logit(z'). The rescale makes W' depend on z only up to a positive factor, so
  where z' reaches 1 or more it is scaled below 1 first (the same W'), and weights that are all zero for a module
  give the base weight there (θ' = 0: every constant z is W). A combination that leaves some z' <= 0 (negative
  weights) has no θ and is refused. Mixing the raw θ instead (what the Transformers² code's few-shot search does)
  is not offered: it is not the paper's mixture, and sigmoid(Σ α θ) is not between the experts' z.

Weights are one number per expert, or per expert a mapping from module name to weight (per-layer mixing). Experts
must share the method (svf), its config, the adapted modules and the base weights (the per-module sha256 that every
saved adapter carries); anything else is refused with an error saying which. The result saves as an ordinary adapter
directory that `load_adapter` reads. On a model that already holds SVF adapters, `apply_vectors` swaps an expert in
place: no re-adapt and no SVD, just a copy of one vector per matrix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import Adapter, weight_matrix
from ..inject import adapters
from ..io import EXTRA_PREFIX, AdapterFile, AdapterFileError, base_fingerprint, read_adapter, write_adapter
from ..linalg import tensor_digest

Weights = Sequence["float | Mapping[str, float]"]


@dataclass(frozen=True)
class Expert:
    """One SVF adapter as data: its saved file (config and every tensor, as `svdtune.io` reads it) under a name.
    Arithmetic changes only the trained vector of every module (z, or θ for sigmoid); every other tensor the file
    holds travels with the result unchanged."""

    name: str
    file: AdapterFile

    @property
    def meta(self) -> dict[str, Any]:
        return self.file.meta

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """The trained vector of every module."""
        return {module: self.file.tensors[f"{module}.{self.key}"] for module in self.meta["modules"]}

    @property
    def heads(self) -> dict[str, torch.Tensor]:
        """Tensors trained in full beside the vectors (a task head): never combined (see `combine`)."""
        return self.file.extra()

    @property
    def key(self) -> str:
        """The trained tensor's name: "z" (direct) or "theta" (sigmoid)."""
        return "theta" if self.meta["config"].get("parametrization") == "sigmoid" else "z"

    @property
    def neutral(self) -> float:
        """The scale the arithmetic is relative to: 1 for direct z (the base model), 0 for sigmoid's plain Σ α z."""
        return 0.0 if self.key == "theta" else 1.0

    def scales(self) -> dict[str, torch.Tensor]:
        """z per module, in float64 (sigmoid(θ) for the sigmoid parametrisation)."""
        return {module: torch.sigmoid(v.double()) if self.key == "theta" else v.double()
                for module, v in self.vectors.items()}

    def offsets(self) -> dict[str, torch.Tensor]:
        return {module: z - self.neutral for module, z in self.scales().items()}


def trained_vector(key: str, z: torch.Tensor, module: str) -> torch.Tensor:
    """The trained tensor that gives scales `z`: z itself (direct), or θ = logit(z) (sigmoid; module docstring)."""
    if key == "z":
        return z
    if bool((z == 0).all()):
        return torch.zeros_like(z)  # all weights zero: the base weight, as a constant z is under the rescale
    if not bool((z > 0).all()):
        raise ValueError(f"the combination leaves z <= 0 in {module} (negative weights?); sigmoid SVF experts "
                         "combine as Σ α_k z_k with z in (0, 1), so use weights that keep every z positive, e.g. "
                         "non-negative ones")
    top = float(z.max())
    if top >= 1:  # same W' under the rescale; logit needs z < 1
        z = z * (0.5 / top)
    return torch.logit(z)


def load_expert(path: str | os.PathLike, name: str | None = None) -> Expert:
    """Read an SVF adapter directory as an expert (named after the directory unless `name` is given)."""
    path = Path(path)
    saved = read_adapter(path)
    meta = saved.meta
    if meta["method"] != "svf":
        raise ValueError(f"{path} is a {meta['method']} adapter; experts are SVF adapters (svdtune.adapt(model, "
                         "'svf')), whose vectors share one singular basis per matrix")
    expert = Expert(name or path.name, saved)
    lacking = [m for m, info in meta["modules"].items() if expert.key not in info["tensors"]]
    if lacking:
        raise AdapterFileError(f"{path} lacks the SVF vector {expert.key!r} of {', '.join(lacking[:3])}; the adapter "
                               "is damaged or was edited")
    return expert


def check_compatible(experts: Sequence[Expert]) -> None:
    """Refuse experts that do not share method config, modules and base weights (the error names the difference)."""
    if not experts:
        raise ValueError("no experts given; pass at least one SVF adapter")
    first = experts[0]
    for other in experts[1:]:
        if other.meta["config"] != first.meta["config"]:
            raise ValueError(f"experts {first.name!r} and {other.name!r} have different SVF configs "
                             f"({first.meta['config']} vs {other.meta['config']}); train them with the same options")
        if set(other.meta["modules"]) != set(first.meta["modules"]):
            raise ValueError(f"experts {first.name!r} and {other.name!r} adapt different modules; train them with "
                             "the same targets")
        differing = [m for m, info in first.meta["modules"].items()
                     if other.meta["modules"][m]["base_sha256"] != info["base_sha256"]]
        if differing:
            raise ValueError(f"experts {first.name!r} and {other.name!r} were trained on different base weights "
                             f"({len(differing)} modules differ, e.g. {differing[0]}); only experts of the same base "
                             "model share a singular basis")


def weight_matrix_of(experts: Sequence[Expert], weights: Weights) -> dict[str, list[float]]:
    """Per module, the weight of every expert: a number applies to all modules, a mapping names modules."""
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights for {len(experts)} experts; give one weight (or one mapping of "
                         "module name to weight) per expert")
    modules = list(experts[0].meta["modules"])
    table: dict[str, list[float]] = {m: [] for m in modules}
    for expert, w in zip(experts, weights):
        if isinstance(w, Mapping):
            unknown = sorted(set(w) - set(modules))
            missing = sorted(set(modules) - set(w))
            if unknown or missing:
                raise ValueError(f"the weights of expert {expert.name!r} must name every adapted module exactly; "
                                 f"unknown: {unknown[:3]}, missing: {missing[:3]}")
        for m in modules:
            table[m].append(float(w[m]) if isinstance(w, Mapping) else float(w))
            if not math.isfinite(table[m][-1]):
                raise ValueError(f"the weight of expert {expert.name!r} is {table[m][-1]}; weights must be finite "
                                 "numbers")
    return table


def combine(experts: Sequence[Expert], weights: Weights, *, name: str = "combined", head: int | None = None) -> Expert:
    """The expert with scales z = neutral + Σ_k w_k (z_k − neutral) per module (see the module docstring).

    Experts trained with a task head (train_also, as `svdtune train` does for classification) have no neutral
    point to combine heads by: `head` names the expert (by index) whose head the result keeps, unchanged.
    """
    check_compatible(experts)
    kept = pick_head(experts, head)
    table = weight_matrix_of(experts, weights)
    first = experts[0]
    offsets = [e.offsets() for e in experts]
    vectors = {}
    for module, ws in table.items():
        z = first.neutral + sum(w * o[module] for w, o in zip(ws, offsets))
        vectors[module] = trained_vector(first.key, z, module).to(first.vectors[module].dtype)
    meta = {**first.meta, "train_also": kept.meta.get("train_also", {}) if kept else {}}
    tensors = {k: t for k, t in first.file.tensors.items() if not k.startswith(EXTRA_PREFIX)}  # all but the head
    tensors.update({f"{module}.{first.key}": v for module, v in vectors.items()})
    tensors.update({f"{EXTRA_PREFIX}{n}": t for n, t in (kept.heads if kept else {}).items()})
    return Expert(name, AdapterFile(meta, tensors))


def pick_head(experts: Sequence[Expert], head: int | None) -> Expert | None:
    """The expert whose task head a combination keeps (None when no expert has one)."""
    carrying = [e.name for e in experts if e.heads]
    if head is None:
        if carrying:
            raise ValueError(f"experts {', '.join(map(repr, carrying))} carry a task head trained in full "
                             f"({', '.join(next(e for e in experts if e.heads).heads)}), which cannot be combined; "
                             "choose the expert whose head the result keeps (head=index, --head DIR)")
        return None
    if not 0 <= head < len(experts):
        raise ValueError(f"head={head} names no expert; pass an index from 0 to {len(experts) - 1}")
    return experts[head]


def add(a: Expert, b: Expert) -> Expert:
    return combine([a, b], [1.0, 1.0], name=f"{a.name}+{b.name}")


def subtract(a: Expert, b: Expert) -> Expert:
    return combine([a, b], [1.0, -1.0], name=f"{a.name}-{b.name}")


def interpolate(a: Expert, b: Expert, t: float) -> Expert:
    """(1 − t)·a + t·b: t = 0 gives a, t = 1 gives b."""
    return combine([a, b], [1.0 - t, t], name=f"{a.name}~{b.name}")


def save_expert(expert: Expert, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `expert` as an ordinary adapter directory (`svdtune.io`'s format: `load_adapter` and `svdtune info` read
    it), every tensor of its file included."""
    meta = {**expert.meta, "combined_from": expert.name}
    tensors = {k: t.contiguous() for k, t in expert.file.tensors.items()}
    return write_adapter(path, AdapterFile(meta, tensors), overwrite=overwrite)


def svf_adapters(model: nn.Module, expert: Expert) -> dict[str, Adapter]:
    """The model's SVF adapters, checked to be the ones `expert` was made for (modules, config, base weights)."""
    found = adapters(model)
    if set(found) != set(expert.meta["modules"]) or any(a.name != "svf" for a in found.values()):
        raise ValueError(f"the model's adapters do not match expert {expert.name!r}: load one of the experts first "
                         "(svdtune.load_adapter(model, path)), then swap the others in")
    if any(dataclasses.asdict(a.config) != expert.meta["config"] for a in found.values()):
        raise ValueError(f"the model's SVF adapters have another config than expert {expert.name!r} "
                         f"({expert.meta['config']})")
    fingerprint = getattr(model, "svdtune_base_fingerprint", None)
    if fingerprint is None:  # hashing every base weight once per model is enough
        fingerprint = base_fingerprint({n: tensor_digest(weight_matrix(a.base)) for n, a in found.items()})
        model.svdtune_base_fingerprint = fingerprint
    if fingerprint != expert.meta.get("base_fingerprint"):
        raise ValueError(f"expert {expert.name!r} was trained on other base weights than this model's")
    return found


@torch.no_grad()
def apply_vectors(model: nn.Module, expert: Expert) -> None:
    """Swap `expert` into a model that holds matching SVF adapters, in place (no re-adapt, no SVD)."""
    for module, adapter in svf_adapters(model, expert).items():
        getattr(adapter, expert.key).copy_(expert.vectors[module])
