"""Checkpoints resume exactly: a run killed between steps and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import svdtune
from svdtune.train.checkpoint import CHECKPOINT_FILE
from svdtune.train.loop import TrainConfig, TrainingDiverged, train

from helpers import VOCAB, make_model

CONFIG = TrainConfig(steps=6, lr=1e-2, checkpoint_every=1, grad_accum=2)


def stream(seed: int = 0, *, die_after: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """A seeded batch stream; with die_after, the process 'is killed' when that many batches have been drawn."""
    gen = torch.Generator().manual_seed(seed)
    drawn = 0
    while True:
        if die_after is not None and drawn == die_after:
            raise KeyboardInterrupt("simulated kill")
        drawn += 1
        yield {"input_ids": torch.randint(0, VOCAB, (4, 9), generator=gen),
               "labels": torch.randint(0, 3, (4,), generator=gen)}


def fresh(method: str) -> torch.nn.Module:
    model = make_model("bert-cls")  # BERT's dropout makes the RNG state part of what must be restored
    return svdtune.adapt(model, method, r=4, train_also="^classifier", verbose=False)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(method: str, tmp_path) -> None:
    torch.manual_seed(7)
    reference = fresh(method)
    train(reference, stream(), CONFIG, progress=False)
    expected = {n: p.clone() for n, p in reference.named_parameters() if p.requires_grad}

    torch.manual_seed(7)
    first = fresh(method)
    with pytest.raises(KeyboardInterrupt):
        train(first, stream(die_after=7), CONFIG, checkpoint_dir=tmp_path, progress=False)  # dies in step 4
    assert (tmp_path / CHECKPOINT_FILE).exists()
    torch.manual_seed(12345)  # a new process: its RNG is whatever it is, the checkpoint must restore it
    resumed = fresh(method)
    result = train(resumed, stream(), CONFIG, checkpoint_dir=tmp_path, progress=False)
    assert len(result.losses) == 6
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name]), name


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path) -> None:
    train(fresh("lora"), stream(), TrainConfig(steps=2), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r'cannot resume .* with other options \(method: was \["lora"\], now '
                                         r'\["lora_xs"\];.*start over in an empty directory'):
        train(fresh("lora_xs"), stream(), TrainConfig(steps=2), checkpoint_dir=tmp_path, progress=False)


def test_divergence_points_at_the_last_good_checkpoint(tmp_path) -> None:
    model = fresh("lora")

    def poisoned() -> Iterator[dict[str, torch.Tensor]]:
        for i, batch in enumerate(stream()):
            if i == 4:
                with torch.no_grad():
                    model.classifier.weight.fill_(float("nan"))
            yield batch

    with pytest.raises(TrainingDiverged, match=f"step 3: the loss is nan.*{tmp_path / CHECKPOINT_FILE} holds the last good state"):
        train(model, poisoned(), TrainConfig(steps=5, grad_accum=2, checkpoint_every=1), checkpoint_dir=tmp_path,
              progress=False)
    assert (tmp_path / CHECKPOINT_FILE).exists()
