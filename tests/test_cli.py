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


OUT_COMMANDS = {  # every command that writes an --out, with the other arguments it needs to get that far
    "train": ["train", "--method", "lora", "--steps", "1"],
    "bench": ["bench"],
    "export-lora": ["export-lora", "some-adapter", "--model", "some-model"],
    "merge": ["merge", "some-adapter", "--model", "some-model"],
    "export-gguf": ["export-gguf", "some-adapter", "--model", "some-model"],
    "spectrum": ["spectrum", "some-model"],
    "experts": ["experts", "combine", "a", "b"],
    "demo": ["demo"],
}


def test_every_out_is_checked_before_any_work_and_a_file_there_is_a_clear_error(tmp_path, capsys) -> None:
    """An --out that is an existing file is refused in one line naming it, before a model or data set loads (the
    arguments above name none that exist), and the file is left as it was."""
    import argparse

    from svdtune.cli.commands import build_parser

    commands = {a.dest for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    writes_out = {name for name, p in sub.choices.items() if any("--out" in a.option_strings for a in p._actions)}
    writes_out |= {"experts"}  # its --out belongs to the `combine` subcommand
    assert commands and writes_out == set(OUT_COMMANDS), "a new command with --out needs a case here"
    target = tmp_path / "taken"
    target.write_text("keep me")
    for name, argv in OUT_COMMANDS.items():
        assert main([*argv, "--out", str(target)]) == 2, name
        err = capsys.readouterr().err
        assert f"svdtune {argv[0]}: error: " in err and str(target) in err and "file" in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert target.read_text() == "keep me"
