"""One rank of the DDP test: train a tiny adapted llama on this rank's half of each global batch, save the adapter.

Run by tests/test_ddp.py through `torchrun --nproc_per_node 2` (gloo on CPU); also importable for the
single-process reference run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import svdtune  # noqa: E402
from svdtune.train.loop import TrainConfig, train  # noqa: E402

from helpers import VOCAB, make_model  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 4
CONFIG = TrainConfig(steps=STEPS, lr=1e-2, warmup_ratio=0.0)


def global_batches() -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, VOCAB, (GLOBAL_BATCH, 12), generator=gen)


def shard(rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    per = GLOBAL_BATCH // world
    for ids in global_batches():
        part = ids[rank * per:(rank + 1) * per]
        yield {"input_ids": part, "labels": part}


def adapted_model() -> torch.nn.Module:
    return svdtune.adapt(make_model(), "pissa", r=4, cache=False, verbose=False)


def trained(rank: int, world: int) -> dict[str, torch.Tensor]:
    model = adapted_model()
    train(model, shard(rank, world), CONFIG, progress=False)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    save_file(trained(rank, world), os.path.join(sys.argv[1], f"rank{rank}.safetensors"))
