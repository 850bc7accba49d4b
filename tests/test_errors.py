"""Bad input gets a clear error that names the problem and the fix, and leaves the model and the user's files alone."""

from __future__ import annotations

import json

import pytest
import torch

import svdtune
from svdtune.atomic import MANIFEST
from svdtune.io import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError

from helpers import make_model, output, tokens, train_steps


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'lorax'.*lora, pissa, milora, olora, lora_xs"):
        svdtune.adapt(make_model(), "lorax")


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="pissa has no option rank; its options are: .*niter.*r"):
        svdtune.adapt(make_model(), "pissa", rank=4)


@pytest.mark.parametrize("options, field", [({"r": 0}, "r must be"), ({"alpha": -1.0}, "alpha must be"),
                                            ({"dropout": 1.5}, "dropout must be"),
                                            ({"factor_dtype": "bfloat16"}, "factor_dtype='bfloat16'"),
                                            ({"niter": -2}, "niter must be")])
def test_invalid_config_values_name_the_field(options, field) -> None:
    with pytest.raises(ValueError, match=field):
        svdtune.adapt(make_model(), "pissa", **options)


RANKED = [name for name, cls in svdtune.METHODS.items() if "r" in cls.Config.__dataclass_fields__]


@pytest.mark.parametrize("method", RANKED)
def test_rank_not_below_min_dimension_is_refused(method: str) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"k_proj: r=16 must be smaller than min\(out, in\) = 16"):
        svdtune.adapt(model, method, r=16, verbose=False)
    assert not svdtune.adapters(model), "a failed adapt must leave the model untouched"
    assert all(p.requires_grad for p in model.parameters())


def test_targets_matching_nothing_shows_module_names() -> None:
    expected = "matches no linear layer. Some linear layers: model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=expected):
        svdtune.adapt(make_model(), "lora", targets=r"attention\.query$")


def test_invalid_targets_regex() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        svdtune.adapt(make_model(), "lora", targets="q_proj(")


def test_targets_as_peft_module_names_match_whole_name_parts() -> None:
    model = svdtune.adapt(make_model(), "lora", targets=["q_proj", "v_proj"], verbose=False)
    assert sorted(svdtune.adapters(model)) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                               for p in ("q_proj", "v_proj")]
    model = svdtune.adapt(make_model(), "lora", targets=("layers.1.mlp.down_proj",), verbose=False)
    assert list(svdtune.adapters(model)) == ["model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("targets, error, message", [(["q_proj", ""], ValueError, "must hold module names"),
                                                     ([], ValueError, "must hold module names"),
                                                     ({"q_proj"}, TypeError, "a list of module names, got set"),
                                                     (["proj"], ValueError, "matches no linear layer")])
def test_bad_targets_lists_are_refused(targets, error, message) -> None:
    with pytest.raises(error, match=message):
        svdtune.adapt(make_model(), "lora", targets=targets, verbose=False)


def test_adapting_an_adapted_model_is_refused() -> None:
    model = svdtune.adapt(make_model(), "lora", verbose=False)
    with pytest.raises(ValueError, match="already has 14 lora adapters; call svdtune.merge.*or svdtune.unload"):
        svdtune.adapt(model, "pissa")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_before_any_svd(bad: float) -> None:
    model = make_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 2] = bad
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj: the weight has 1 NaN/Inf entries"):
        svdtune.adapt(model, "pissa", verbose=False)
    assert not svdtune.adapters(model)


def test_no_default_targets_for_an_unknown_architecture() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    expected = "no default targets for this architecture; pass targets=.*Some linear layers: 0"
    with pytest.raises(ValueError, match=expected):
        svdtune.adapt(model, "lora")
    assert svdtune.adapt(model, "lora", targets="0", r=2, verbose=False) is model


def saved(tmp_path, method: str = "pissa"):
    model = svdtune.adapt(make_model(), method, r=4, verbose=False)
    train_steps(model, steps=1)
    return model, svdtune.save_adapter(model, tmp_path / "adapter")


def test_adapter_for_another_base_is_refused(tmp_path) -> None:
    _, path = saved(tmp_path)
    other = make_model(seed=1)
    with pytest.raises(AdapterFileError, match="differs from the one the adapter was built on.*check_base=False"):
        svdtune.load_adapter(other, path)
    assert not svdtune.adapters(other)
    svdtune.load_adapter(other, path, check_base=False)  # the explicit escape hatch works
    assert len(svdtune.adapters(other)) == 14


def test_adapter_for_another_dtype_says_so(tmp_path) -> None:
    _, path = saved(tmp_path)
    with pytest.raises(AdapterFileError, match="adapter's base was float32, this one is float64"):
        svdtune.load_adapter(make_model(dtype=torch.float64), path)


def test_adapter_for_another_architecture_is_refused(tmp_path) -> None:
    _, path = saved(tmp_path)
    with pytest.raises(AdapterFileError, match="which this model does not have"):
        svdtune.load_adapter(make_model("gpt2"), path)


def test_missing_adapter_directory(tmp_path) -> None:
    with pytest.raises(AdapterFileError, match=f"no svdtune adapter at .*{CONFIG_FILE} is missing"):
        svdtune.load_adapter(make_model(), tmp_path / "nowhere")


def test_truncated_weights_file(tmp_path) -> None:
    _, path = saved(tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    model = make_model()
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        svdtune.load_adapter(model, path)
    assert not svdtune.adapters(model)


def test_missing_weights_file(tmp_path) -> None:
    _, path = saved(tmp_path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFileError, match="adapter.safetensors is missing"):
        svdtune.load_adapter(make_model(), path)


def test_damaged_config_file(tmp_path) -> None:
    _, path = saved(tmp_path)
    text = (path / CONFIG_FILE).read_text()
    (path / CONFIG_FILE).write_text(text[:40])
    with pytest.raises(AdapterFileError, match="is not valid JSON"):
        svdtune.load_adapter(make_model(), path)
    (path / CONFIG_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdapterFileError, match="is not an svdtune adapter config"):
        svdtune.load_adapter(make_model(), path)


def test_weights_from_another_adapter_are_refused(tmp_path) -> None:
    _, path = saved(tmp_path, "pissa")
    _, other = saved(tmp_path / "x", "lora_xs")
    (path / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    expected = "does not hold the adapter that was saved there: adapter.safetensors is truncated or corrupt"
    with pytest.raises(AdapterFileError, match=expected):
        svdtune.load_adapter(make_model(), path)


def test_existing_adapter_directory_is_not_overwritten(tmp_path) -> None:
    model, path = saved(tmp_path)
    before = {f: (path / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    train_steps(model, steps=1)
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True"):
        svdtune.save_adapter(model, path)
    assert {f: (path / f).read_bytes() for f in before} == before
    svdtune.save_adapter(model, path, overwrite=True)
    assert (path / WEIGHTS_FILE).read_bytes() != before[WEIGHTS_FILE]
    assert sorted(p.name for p in path.iterdir()) == sorted([*before, MANIFEST]), "no temporary files may be left"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "nor temporary siblings"


def test_a_file_in_the_way_is_not_replaced(tmp_path) -> None:
    model, _ = saved(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        svdtune.save_adapter(model, target, overwrite=True)
    assert target.read_text() == "mine"


def test_saving_a_model_without_adapters(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no svdtune adapters; call svdtune.adapt"):
        svdtune.save_adapter(make_model(), tmp_path / "a")


def test_loading_onto_an_adapted_model_is_refused(tmp_path) -> None:
    model, path = saved(tmp_path)
    ids = tokens()
    before = output(model, ids)
    with pytest.raises(ValueError, match="already has 14 pissa adapters"):
        svdtune.load_adapter(model, path)
    assert torch.equal(output(model, ids), before)
