"""train_also: a task head trained in full beside the adapters, saved and loaded with them."""

from __future__ import annotations

import pytest
import torch

import svdtune
from svdtune.cli.commands import main
from svdtune.io import AdapterFileError

from helpers import make_model, tokens, train_steps


def classify(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_the_head_trains_and_round_trips_bit_exactly(tmp_path, capsys) -> None:
    model = svdtune.adapt(make_model("bert-cls"), "lora", r=4, train_also=r"^classifier\.", verbose=False)
    head = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("classifier")}
    assert head == {"classifier.weight", "classifier.bias"}
    assert model.svdtune_summary.train_also == 32 * 3 + 3
    before = model.classifier.weight.clone()
    train_steps(model)
    assert not torch.equal(model.classifier.weight, before)
    ids = tokens()
    expected = classify(model, ids)
    path = svdtune.save_adapter(model, tmp_path / "a")
    fresh = make_model("bert-cls", seed=0)
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # a freshly initialised head differs from the trained one
    svdtune.load_adapter(fresh, path)
    assert torch.equal(classify(fresh, ids), expected)
    assert fresh.classifier.weight.requires_grad
    assert main(["info", str(path)]) == 0
    assert "train_also  classifier.weight 3×32 float32" in capsys.readouterr().out


def test_train_also_matching_nothing_is_an_error() -> None:
    model = make_model("bert-cls")
    with pytest.raises(ValueError, match="train_also='head' matches no parameter. Some parameter names: .*classifier"):
        svdtune.adapt(model, "lora", train_also="head")
    assert not svdtune.adapters(model)


def test_train_also_may_not_unfreeze_an_adapted_layer() -> None:
    with pytest.raises(ValueError, match="selects weights of adapted layers"):
        svdtune.adapt(make_model("bert-cls"), "lora", train_also="query")


def test_loading_a_head_onto_a_model_without_it_is_refused(tmp_path) -> None:
    model = svdtune.adapt(make_model("bert-cls"), "lora", r=4, train_also="^classifier", verbose=False)
    path = svdtune.save_adapter(model, tmp_path / "a")
    other = make_model("bert")
    with pytest.raises(AdapterFileError, match="carries a trained classifier.weight"):
        svdtune.load_adapter(other, path)
    assert not svdtune.adapters(other) and all(p.requires_grad for p in other.parameters())
