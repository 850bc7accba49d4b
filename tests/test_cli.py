"""The `svdtune` command, called through `main(argv)`."""

from __future__ import annotations

import svdtune
from svdtune.cli.commands import main

from helpers import make_model


def test_methods_lists_every_method_with_its_formulas(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in svdtune.METHODS.items():
        assert f"{name}\n  paper      {cls.paper}" in out
        assert cls.delta_formula in out and cls.params_formula in out
    assert "niter=None" in out and "init_std=1e-05" in out


def test_info_describes_a_saved_adapter(tmp_path, capsys) -> None:
    model = svdtune.adapt(make_model(), "lora_xs", r=4, verbose=False)
    path = svdtune.save_adapter(model, tmp_path / "a")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "method      lora_xs: LoRA-XS" in out
    assert "trainable   224 parameters (r² per m×n matrix)" in out  # 14 matrices x 4²
    assert "14 modules, float32" in out and "self_attn.q_proj                2  32×32" in out
    fingerprint = svdtune.read_adapter_config(path)["base_fingerprint"]
    assert f"fingerprint {fingerprint}" in out and len(fingerprint) == 16


def test_info_on_a_missing_adapter_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "svdtune info: error: no svdtune adapter at" in capsys.readouterr().err


def test_cache_reports_and_clears_the_factor_cache(capsys) -> None:
    svdtune.adapt(make_model(), "pissa", r=4, verbose=False)  # the session's isolated cache now holds entries
    assert main(["cache"]) == 0
    assert "cached factorisations" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert main(["cache"]) == 0
    assert ": 0 cached factorisations, 0.0 MB" in capsys.readouterr().out.splitlines()[-1]
    model = svdtune.adapt(make_model(), "pissa", r=4, verbose=False)
    assert model.svdtune_summary.cache_misses == 14, "after --clear every factorisation is computed again"


def test_option_pairs_are_parsed_as_json_values() -> None:
    from svdtune.cli.commands import parse_options

    assert parse_options(["niter=4", "rslora=true", "factor_dtype=float64"]) == {
        "niter": 4, "rslora": True, "factor_dtype": "float64"}


def test_train_refuses_a_non_empty_output_directory(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", "--method", "lora", "--out", str(tmp_path)]) == 2
    assert "already exists and is not empty; pass --resume to continue its run, --overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
