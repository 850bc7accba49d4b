"""Interoperability with the PEFT LoRA format that serving stacks load (vLLM multi-LoRA, PEFT, TGI, ...).

`export_lora` writes `adapter_model.safetensors` + `adapter_config.json` relative to the **original** base weights:
exact for every method whose update is low-rank (`Adapter.low_rank()`: LoRA and LoRA-XS at rank r, PiSSA/MiLoRA/OLoRA
at rank 2r as [B | -B0][A ; A0]); with `rank=k` every update is instead truncated to its best rank-k approximation
(SVD of ΔW), and the relative error per module is reported and written into the output (svdtune_export.json).

Two layouts of the same update:
* `layout="serving"` (the default): what serving stacks read right. vLLM reads only `r`, `lora_alpha`,
  `target_modules`, `use_rslora`, `bias` and `modules_to_save`, scales every module by the one global
  lora_alpha / r, and accepts ranks from a fixed set up to its `--max-lora-rank`; so every module's own scale is
  folded into its B, every update is zero-padded to one rank from that set (`SERVING_RANKS`), and lora_alpha = r
  makes the global scale 1. No `rank_pattern`/`alpha_pattern`, no `modules_to_save`. PEFT loads it to the same
  outputs. `serving_problems` checks a written adapter against these rules.
* `layout="per-module"`: the smallest exact export, each module at its own rank and scale through PEFT's
  `rank_pattern`/`alpha_pattern` (alpha_k = s·k, so PEFT's alpha/r is our s exactly); only PEFT honours the patterns,
  so vLLM would serve adaptive-rank (AdaLoRA, LoRA², ALoRA) or mixed-scale exports with wrong scales.

`load_peft_lora` reads a PEFT LoRA adapter into svdtune `lora` adapters, so it can be merged, analysed, combined or
trained further.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .atomic import check_replaceable, write_directory
from .core import Adapter, LowRank
from .inject import adapters, ensure_not_adapted, extra_trainable, install
from .io import AdapterFileError, holds_adapter
from .methods.lora import LoRA, LoRAConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
EXPORT_REPORT = "svdtune_export.json"  # kept out of adapter_config.json: PEFT and servers warn on unknown keys
SERVING_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM accepts
LAYOUTS = ("serving", "per-module")


def truncate(delta: torch.Tensor, rank: int | None = None, *, energy: float | None = None) -> tuple[LowRank, float]:
    """Best low-rank factors of a dense update (Eckart-Young) and the relative Frobenius error they leave.

    The rank is `rank`, or the smallest that keeps at least the fraction `energy` of Σσ² (then error² <= 1 - energy).
    """
    U, S, Vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    if energy is not None:
        kept = S.pow(2).cumsum(0) / S.pow(2).sum().clamp_min(1e-300)
        rank = int((kept < energy - 1e-12).sum()) + 1
    k = max(1, min(rank, S.numel()))
    root = torch.sqrt(S[:k])
    total = float(torch.linalg.vector_norm(S))
    error = float(torch.linalg.vector_norm(S[k:])) / total if total > 0 else 0.0
    return LowRank((U[:, :k] * root).to(delta.dtype), (root[:, None] * Vh[:k]).to(delta.dtype), 1.0), error


def plain_adapters(model: nn.Module, carrier: str, instead: str) -> dict[str, Adapter]:
    """The model's adapters, refusing a model without any, or one that also trains whole tensors (`train_also`, e.g.
    a task head) that `carrier` has no place for (`instead` says what to do)."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no svdtune adapters to export; call svdtune.adapt or load_adapter first")
    if extra_trainable(model):
        raise ValueError(f"this adapter trains extra parameters in full (train_also, e.g. a task head), which "
                         f"{carrier} cannot carry; {instead}")
    return found


def checked_adapters(model: nn.Module, rank: int | None, energy: float | None, layout: str) -> dict[str, Adapter]:
    """The model's adapters, once the export options and the model are known to make a PEFT LoRA adapter."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if rank is not None and energy is not None:
        raise ValueError("pass rank or energy, not both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    found = plain_adapters(model, "a PEFT LoRA adapter", "export the merged model instead (svdtune merge)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return found


def factors_to_export(found: dict[str, Adapter], rank: int | None,
                      energy: float | None) -> tuple[dict[str, LowRank], dict[str, float]]:
    """Per module, the LoRA factors to write (exact, or truncated to `rank`/`energy`) and their relative error."""
    errors: dict[str, float] = {}
    exported: dict[str, LowRank] = {}
    for name, adapter in found.items():
        factors = adapter.low_rank() if rank is None and energy is None else None
        errors[name] = 0.0
        if factors is None:
            if rank is None and energy is None:
                raise ValueError(f"{name}: {adapter.name} updates are not low-rank; pass rank=k (or energy=0.99) to "
                                 "export the best low-rank approximation of each update")
            factors, errors[name] = truncate(adapter.delta(), rank, energy=energy)
        exported[name] = factors
    return exported, errors


def export_lora(model: nn.Module, path: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
                overwrite: bool = False, layout: str = "serving", max_lora_rank: int | None = None) -> dict[str, float]:
    """Write the model's adapters as a PEFT LoRA adapter on the original base; returns the error per module.

    Errors are 0.0 for exact exports. With `rank` (or `energy`, a fraction of each update's Σσ² to keep) every update
    is truncated; methods without exact low-rank factors need one of the two. `layout`: "serving" or "per-module"
    (module docstring); `max_lora_rank`: the serving stack's limit (vLLM's `--max-lora-rank`), checked for "serving".
    """
    found = checked_adapters(model, rank, energy, layout)
    path = Path(path)
    if holds_adapter(path):
        raise FileExistsError(f"{path} holds an svdtune adapter, which a PEFT export there would replace; export "
                              "to another directory")
    check_replaceable(path, overwrite=overwrite)
    exported, errors = factors_to_export(found, rank, energy)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if layout == "serving":  # one rank for the whole adapter, every module's scale folded into its B
        top = serving_rank(max(f.rank for f in exported.values()), max_lora_rank)
        exported = {name: padded(factors, top) for name, factors in exported.items()}
    for name, factors in exported.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = factors.A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = factors.B.detach().contiguous()
        ranks[name], alphas[name] = factors.rank, factors.scale * factors.rank
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "r": r, "lora_alpha": alpha,
        "target_modules": sorted(found), "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha}, "use_rslora": False, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": any(isinstance(a.base, Conv1D) for a in found.values()),
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    report = {"method": next(iter(found.values())).name, "layout": layout, "truncated_rank": rank, "energy": energy,
              "ranks": ranks, "relative_error": errors,
              "max_relative_error": max(errors.values())}

    def fill(tmp: Path) -> None:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")

    write_directory(path, fill, own={PEFT_WEIGHTS, PEFT_CONFIG, EXPORT_REPORT})
    return errors


def serving_rank(rank: int, max_lora_rank: int | None) -> int:
    """The smallest rank of SERVING_RANKS that holds `rank`, within `max_lora_rank`; a clear error otherwise."""
    fits = [k for k in SERVING_RANKS if k >= rank]
    limit = max_lora_rank if max_lora_rank is not None else SERVING_RANKS[-1]
    if not fits or fits[0] > limit:
        raise ValueError(f"an update of rank {rank} needs a serving rank above max_lora_rank={limit}; truncate it "
                         "with rank=k (--rank k) or raise the server's limit (vLLM --max-lora-rank)")
    return fits[0]


def padded(factors: LowRank, rank: int) -> LowRank:
    """The same update at scale 1 with `rank` columns: s folded into B, zero rows/columns added (exact)."""
    A, B = factors.A.detach(), factors.scale * factors.B.detach()
    extra = rank - A.shape[0]
    return LowRank(torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1).contiguous(),
                   torch.cat([A, A.new_zeros(extra, A.shape[1])]).contiguous(), 1.0)


def serving_problems(path: str | os.PathLike, max_lora_rank: int | None = None) -> list[str]:
    """What a serving stack that reads only r, lora_alpha, target_modules, use_rslora, bias and modules_to_save
    (vLLM) would get wrong or refuse in the PEFT LoRA adapter at `path`; empty when it serves it as PEFT would."""
    path = Path(path)
    config = json.loads((path / PEFT_CONFIG).read_text())
    tensors = load_file(path / PEFT_WEIGHTS)
    problems = [f"{key} is set: a server that ignores it scales or sizes those modules wrongly"
                for key in ("rank_pattern", "alpha_pattern") if config.get(key)]
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set: vLLM refuses adapters that train extra modules")
    r = config.get("r")
    if r not in SERVING_RANKS or (max_lora_rank is not None and r > max_lora_rank):
        problems.append(f"r={r} is not a servable rank ({SERVING_RANKS}, at most max_lora_rank={max_lora_rank})")
    if config.get("bias", "none") != "none" or config.get("use_dora"):
        problems.append("bias or DoRA terms are not served")
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight") and t.shape[0] != r or key.endswith(".lora_B.weight") and t.shape[1] != r:
            problems.append(f"{key} has rank {t.shape[0] if '.lora_A.' in key else t.shape[1]}, not the global r={r}")
    return problems


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def load_peft_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into `model` as svdtune `lora` adapters (per-module rank and scale)."""
    path = Path(path)
    try:
        config = json.loads((path / PEFT_CONFIG).read_text())
        tensors = load_file(path / PEFT_WEIGHTS)
    except FileNotFoundError as e:
        raise AdapterFileError(f"no PEFT adapter at {path}: {Path(e.filename).name} is missing") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterFileError(f"{path} is not a plain LoRA adapter (peft_type {config.get('peft_type')!r}, "
                               "DoRA or modules_to_save are not supported)")
    ensure_not_adapted(model)
    built = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        A, B = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        k = A.shape[0]
        alpha = float(_pattern(config.get("alpha_pattern", {}), name, config.get("lora_alpha", 8)))
        module_config = LoRAConfig(r=k, alpha=alpha, rslora=bool(config.get("use_rslora")))
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise AdapterFileError(f"the PEFT adapter targets {name}, which this model does not have") from None
        built[name] = LoRA.restore(layer, module_config, {"A": A.to(layer.weight.device, layer.weight.dtype),
                                                          "B": B.to(layer.weight.device, layer.weight.dtype)},
                                   {"A", "B"})
    if not built:
        raise AdapterFileError(f"{path / PEFT_WEIGHTS} holds no lora_A/lora_B weights")
    install(model, built)
    return model


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule for rank/alpha patterns: a key applies when the module name ends with it (a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
