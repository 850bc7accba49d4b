"""Training checkpoints that resume exactly: one safetensors file, written atomically, never pickle.

A checkpoint holds what the next step depends on: the trainable parameters (by name), the AdamW state, the learning
rate schedule, the torch RNG state (dropout), the number of optimizer steps and of batches drawn from the data stream
(so a seeded stream can be fast-forwarded to the same position), and the loss history. Tensors are the file's tensors;
everything else is JSON in its metadata. The file is replaced atomically, so a process killed at any moment leaves
either the previous complete checkpoint or the new one. The metadata also holds a checksum of every tensor (a
damaged file is refused, not resumed from) and the run's options (`run`): a resume with other options is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..linalg import tensors_checksum
from ..paths import write_atomic
from .runrecord import refuse_changes

CHECKPOINT_FILE = "checkpoint.safetensors"
EXTRA = "extra/"


@dataclass
class Progress:
    """Where training stands: optimizer steps done, batches drawn, and what was logged so far."""

    step: int = 0
    batches: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: Progress, extra: dict[str, torch.Tensor] | None = None,
                    run: dict[str, Any] | None = None) -> Path:
    """`extra`: more state to keep (the rank allocator's masks and EMAs), read back by `read_extra`; `run`: the
    options the run was started with, compared by `load_checkpoint`."""
    tensors = {f"param/{n}": p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"{EXTRA}{k}": t.detach().contiguous().cpu() for k, t in (extra or {}).items()})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"progress": progress.__dict__, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(),
            "run": run, "checksum": tensors_checksum(tensors[k] for k in sorted(tensors))}
    target = directory / CHECKPOINT_FILE
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))
    return target


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    run: dict[str, Any] | None = None) -> Progress:
    """Restore a checkpoint into a model adapted the same way, its fresh optimizer and scheduler; returns progress.

    With `run`, the options the checkpoint was written with must be the same (else ResumeMismatch, before anything
    is restored)."""
    path = directory / CHECKPOINT_FILE
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable svdtune checkpoint ({e}); delete it to start over") from None
    if "checksum" in meta and meta["checksum"] != tensors_checksum(tensors[k] for k in sorted(tensors)):
        raise ValueError(f"{path} is damaged (its tensors do not match the checksum written with them); delete it "
                         "to start over")
    if run is not None:
        refuse_changes(meta.get("run"), run, path, f"start over in an empty directory (or delete {path})")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved != set(params):
        raise ValueError(f"{path} was written for other trainable parameters ({len(saved)} saved, {len(params)} here): "
                         "resume with the same method, options and targets, or start in a new directory")
    wrong = [n for n, p in params.items() if tensors[f"param/{n}"].shape != p.shape]
    if wrong:
        raise ValueError(f"{path} holds {wrong[0]} as {tuple(tensors['param/' + wrong[0]].shape)}, the model has "
                         f"{tuple(params[wrong[0]].shape)}: resume with the same method and options (rank), or start "
                         "in a new directory")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    return Progress(**meta["progress"])


def read_extra(directory: Path) -> dict[str, torch.Tensor]:
    """The `extra` state saved with the checkpoint in `directory` (empty if none was)."""
    with safe_open(directory / CHECKPOINT_FILE, framework="pt") as f:
        return {k.removeprefix(EXTRA): f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA)}
