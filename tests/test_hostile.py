"""Hostile inputs, one table: damaged and hand-edited adapter files, bad options and numbers, odd data rows, resumes
with changed options, and the command line. Each case asserts its own specific, clear error (a typed exception in
Python; one line and exit code 2 at the CLI), never a silently wrong result, a hang or a traceback.
"""

from __future__ import annotations

import contextlib
import io as stdio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import svdtune
from svdtune.atomic import MANIFEST, write_manifest
from svdtune.cli import commands
from svdtune.data.classification import seeded_chunks
from svdtune.data.userfiles import DataFileError, load_rows
from svdtune.experts.arithmetic import combine, load_expert
from svdtune.io import CONFIG_FILE, WEIGHTS_FILE, AdapterFileError
from svdtune.linalg import CacheWarning, Factorizer, svd
from svdtune.patterns import PatternError
from svdtune.train.checkpoint import CHECKPOINT_FILE, Progress, load_checkpoint, save_checkpoint
from svdtune.train.loop import TrainConfig
from svdtune.train.runrecord import RUN_FILE, ResumeMismatch, write_record

from helpers import make_model, train_steps

Q = "model.layers.0.self_attn.q_proj"


class CliFailed(Exception):
    """The CLI exited with code 2 and printed exactly one line (the message)."""


def cli_error(*argv: str) -> None:
    err = stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdio.StringIO()):
        code = commands.main(list(argv))
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, f"expected one error line and exit code 2, got {code}: {lines}"
    raise CliFailed(lines[0])


def saved(tmp: Path, method: str = "pissa", r: int = 4) -> Path:
    model = svdtune.adapt(make_model(), method, r=r, verbose=False)
    train_steps(model, steps=1)
    return svdtune.save_adapter(model, tmp / "adapter")


def edit_config(path: Path, change: Callable[[dict], object], *, manifest: bool = True) -> Path:
    """Edit the saved config; with `manifest`, also re-record it (a consistent directory with a wrong config)."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    change(meta)
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    if manifest:
        write_manifest(path)
    return path


def edit_tensors(path: Path, change: Callable[[dict], object]) -> Path:
    """Rewrite the weights file with `change` applied, and the manifest to match (so only deeper checks see it)."""
    tensors = load_file(path / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, path / WEIGHTS_FILE)
    write_manifest(path)
    return path


def flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-7] ^= 0x10
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:99])


def retyped(dtype: torch.dtype) -> Callable[[dict], None]:
    return lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()})


def load(path: Path) -> None:
    svdtune.load_adapter(make_model(), path)


def drop_module(meta: dict) -> None:
    meta["modules"].pop(Q)


def without_module(tmp: Path) -> Path:
    path = edit_config(saved(tmp), drop_module)
    return edit_tensors(path, lambda t: [t.pop(k) for k in [k for k in t if k.startswith(f"{Q}.")]])


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return make_model()


def data_file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def prior_run(tmp: Path, *argv: str) -> Path:
    """An --out directory as `svdtune train ARGV` leaves it mid-run: a checkpoint and the run's recorded options."""
    args = commands.build_parser().parse_args(["train", *argv, "--out", str(tmp / "run")])
    write_record(tmp / "run" / "checkpoint", commands.train_record(args))
    (tmp / "run" / "checkpoint" / CHECKPOINT_FILE).write_bytes(b"")
    return tmp / "run"


def checkpoint_of(tmp: Path, lr: float) -> tuple:
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp, model, optimizer, scheduler, Progress(step=1), run={"lr": lr})
    return model, optimizer, scheduler


def damaged_checkpoint(tmp: Path) -> None:
    state = checkpoint_of(tmp, 0.01)
    tensors = load_file(tmp / CHECKPOINT_FILE)
    from safetensors import safe_open

    with safe_open(tmp / CHECKPOINT_FILE, framework="pt") as f:
        metadata = f.metadata()
    tensors[next(k for k in tensors if k.startswith("param/"))].view(-1)[0] += 1
    save_file(tensors, tmp / CHECKPOINT_FILE, metadata=metadata)
    load_checkpoint(tmp, *state)


def svf_experts(tmp: Path, arch: str = "llama", **options) -> list:
    paths = []
    for seed in (0, 1):
        model = svdtune.adapt(make_model(arch), "svf", verbose=False, **options)
        torch.manual_seed(seed)
        train_steps(model, steps=1)
        paths.append(svdtune.save_adapter(model, tmp / f"expert{seed}"))
    return paths


def resumed(tmp: Path, before: list[str], after: list[str]) -> None:
    out = prior_run(tmp, *before)
    cli_error("train", *after, "--out", str(out), "--resume")


BASE_RUN = ["--method", "lora", "--r", "4", "--lr", "0.001"]


@dataclass(frozen=True)
class Case:
    name: str
    act: Callable[[Path], object]
    error: type[BaseException]
    match: str


CASES = [
    # adapter files: damaged, edited by hand, mixed
    Case("bit flip in the weights", lambda t: (flip_a_bit(saved(t) / WEIGHTS_FILE), load(t / "adapter")),
         AdapterFileError, "adapter.safetensors is corrupt or was edited"),
    Case("truncated weights", lambda t: (truncate(saved(t) / WEIGHTS_FILE), load(t / "adapter")),
         AdapterFileError, "adapter.safetensors is truncated or corrupt"),
    Case("alpha edited by hand", lambda t: load(edit_config(saved(t), lambda m: m["config"].update(alpha=64.0),
                                                            manifest=False)),
         AdapterFileError, "adapter_config.json is .*or was edited"),
    Case("manifest removed", lambda t: (lambda p: ((p / MANIFEST).unlink(), load(p)))(saved(t)),
         AdapterFileError, "manifest.json is missing"),
    Case("r raised above the tensors' rank", lambda t: load(edit_config(saved(t), lambda m: m["config"].update(r=8))),
         AdapterFileError, f"{Q}.A is \\(4, 32\\) float32, but a pissa adapter .* has \\(8, 32\\)"),
    Case("method relabelled lora -> pissa", lambda t: load(edit_config(saved(t, "lora"),
                                                                       lambda m: m.update(method="pissa"))),
         AdapterFileError, "holds A, B, but a pissa adapter has A, A0, B, B0: its method or config does not match"),
    Case("modules emptied", lambda t: load(edit_config(saved(t), lambda m: m["modules"].clear())),
         AdapterFileError, "lists no modules"),
    Case("one module dropped", lambda t: load(without_module(t)),
         AdapterFileError, r"select 14 layers of this model, but it holds no adapter for 1 of them \(" + Q),
    Case("module dropped from the config only", lambda t: load(edit_config(saved(t), drop_module)),
         AdapterFileError, f"holds tensors the config does not list \\({Q}"),
    Case("fp16 tensors on a float32 base", lambda t: load(edit_tensors(saved(t), retyped(torch.float16))),
         AdapterFileError, r"\.A is \(4, 32\) float16, but a pissa adapter .* float32 weight has \(4, 32\) float32"),
    Case("int64 tensors", lambda t: load(edit_tensors(saved(t), retyped(torch.int64))),
         AdapterFileError, r"\.A is \(4, 32\) int64, but"),
    Case("NaN in a tensor", lambda t: load(edit_tensors(saved(t), lambda d: d[f"{Q}.B"].fill_(float("nan")))),
         AdapterFileError, f"{Q}.B holds NaN/Inf values"),
    Case("transposed tensor",
         lambda t: load(edit_tensors(saved(t), lambda d: d.update({f"{Q}.A": d[f"{Q}.A"].T.contiguous()}))),
         AdapterFileError, r"\.A is \(32, 4\) float32, but .* has \(4, 32\)"),
    Case("extra tensor", lambda t: load(edit_tensors(saved(t), lambda d: d.update(stowaway=torch.zeros(2)))),
         AdapterFileError, r"holds tensors the config does not list \(stowaway\)"),
    Case('format_version "1"', lambda t: load(edit_config(saved(t), lambda m: m.update(format_version="1"))),
         AdapterFileError, "format_version must be a positive integer, got '1'"),
    Case("config null", lambda t: load(edit_config(saved(t), lambda m: m.update(config=None))),
         AdapterFileError, "'config' must be a JSON object, got null"),
    Case("load onto a meta-device model", lambda t: svdtune.load_adapter(meta_model(), saved(t)),
         ValueError, f"{Q}: the weight is on the meta device"),
    Case("save under a file", lambda t: ((t / "file").write_text("x"),
                                         svdtune.save_adapter(svdtune.adapt(make_model(), "lora", verbose=False),
                                                              t / "file" / "adapter")),
         FileExistsError, "file is a file, so the directory .* cannot be created"),
    Case("export into the source adapter",
         lambda t: svdtune.export_lora(svdtune.load_adapter(make_model(), saved(t, "lora")), t / "adapter",
                                       overwrite=True),
         FileExistsError, "holds an svdtune adapter, which a PEFT export there would replace"),
    # bad numbers and options
    Case("alpha=inf", lambda t: svdtune.adapt(make_model(), "lora", alpha=float("inf")),
         ValueError, "lora option alpha=inf is not a finite number"),
    Case("export at rank 0",
         lambda t: svdtune.export_lora(svdtune.load_adapter(make_model(), saved(t)), t / "x", rank=0),
         ValueError, "rank must be a positive integer, got 0"),
    Case("expert weights NaN", lambda t: combine([load_expert(p) for p in svf_experts(t)], [float("nan")] * 2),
         ValueError, "weight of expert 'expert0' is nan; weights must be finite"),
    Case("learning rate inf", lambda t: TrainConfig(lr=float("inf")), ValueError, "learning rates must be finite"),
    Case("catastrophic-backtracking targets", lambda t: svdtune.adapt(make_model(), "lora",
                                                                      targets=r"^([a-z_.0-9]+)*!"),
         ValueError, "matches no linear layer"),
    Case("invalid train_also regex", lambda t: svdtune.adapt(make_model(), "lora", train_also="lm_head("),
         PatternError, r"train_also='lm_head\(' is not a valid regular expression"),
    Case("adapt a meta-device model", lambda t: svdtune.adapt(meta_model(), "lora"),
         ValueError, f"{Q}: the weight is on the meta device"),
    Case("batch larger than the split", lambda t: next(seeded_chunks([{"text": "a", "label": 0}] * 3, batch_size=16,
                                                                     seed=0)),
         ValueError, "batch size 16 does not fit the training split of 3 rows"),
    Case("damaged checkpoint", damaged_checkpoint, ValueError, "is damaged .*checksum"),
    Case("resume with another lr (Python)", lambda t: load_checkpoint(t, *checkpoint_of(t, 0.01), run={"lr": 0.1}),
         ResumeMismatch, r"lr: was 0.01, now 0.1"),
    # data rows
    Case("non-UTF-8 byte",
         lambda t: load_rows(data_file(t, "d.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
                                                     b'{"text": "\xff"}\n'), num_labels=2),
         DataFileError, r"d.jsonl, line 3: byte 0xff is not UTF-8"),
    Case("duplicated CSV header", lambda t: load_rows(data_file(t, "d.csv", b"text,label,text\na,0,b\n"), num_labels=2),
         DataFileError, "line 1: the header names 'text' more than once"),
    Case("CSV row with more fields than the header",
         lambda t: load_rows(data_file(t, "d.csv", b"text,label\na,0\nb,c,1\n"), num_labels=2),
         DataFileError, "line 3: 3 fields but the header has 2"),
    # the command line: one line, exit code 2
    Case("CLI --batch-size -1", lambda t: cli_error("train", "--method", "lora", "--batch-size", "-1", "--out", str(t)),
         CliFailed, "svdtune train: error: --batch-size must be at least 1, got -1"),
    Case("CLI --out under a file", lambda t: ((t / "f").write_text("x"),
                                              cli_error("train", "--method", "lora", "--out", str(t / "f" / "run"))),
         CliFailed, "f is a file, so the directory .* cannot be created"),
    Case("CLI --lr inf", lambda t: cli_error("train", "--method", "lora", "--lr", "inf", "--out", str(t / "run")),
         CliFailed, "learning rates must be finite and > 0"),
    Case("CLI resume with another --lr",
         lambda t: resumed(t, BASE_RUN, ["--method", "lora", "--r", "4", "--lr", "1e9"]),
         CliFailed, r"cannot resume .*\(--lr: was 0.001, now 1000000000.0\).*start over with --overwrite"),
    Case("CLI resume with another --method", lambda t: resumed(t, BASE_RUN, ["--method", "pissa", "--r", "4"]),
         CliFailed, r'--method: was "lora", now "pissa"'),
    Case("CLI resume with another --r", lambda t: resumed(t, BASE_RUN, ["--method", "lora", "--r", "8"]),
         CliFailed, r"--r: was 4, now 8"),
    Case("CLI resume with another --option", lambda t: resumed(t, BASE_RUN, [*BASE_RUN, "--option", "alpha=64"]),
         CliFailed, r'--option: was \{\}, now \{"alpha": 64\}'),
    Case("CLI resume with another --seed and --batch-size",
         lambda t: resumed(t, BASE_RUN, [*BASE_RUN, "--seed", "1", "--batch-size", "8"]),
         CliFailed, r"--batch-size: was 16, now 8; --seed: was 0, now 1"),
    Case("CLI resume after the data file changed",
         lambda t: (data_file(t, "d.jsonl", b'{"text": "a", "label": 0}\n'),
                    out := prior_run(t, *BASE_RUN, "--data", str(t / "d.jsonl")),
                    data_file(t, "d.jsonl", b'{"text": "b", "label": 1}\n'),
                    cli_error("train", *BASE_RUN, "--data", str(t / "d.jsonl"), "--out", str(out), "--resume")),
         CliFailed, r'--data: was "sha256:'),
    Case("CLI resume with a damaged run record",
         lambda t: ((prior_run(t, *BASE_RUN) / "checkpoint" / RUN_FILE).write_text("{"),
                    cli_error("train", *BASE_RUN, "--out", str(t / "run"), "--resume")),
         CliFailed, "run.json is damaged"),
    Case("CLI info on a bit-flipped adapter", lambda t: (flip_a_bit(saved(t) / WEIGHTS_FILE),
                                                         cli_error("info", str(t / "adapter"))),
         CliFailed, "svdtune info: error: .* adapter.safetensors is corrupt or was edited"),
    Case("CLI experts combine --weights 1e6 -inf",
         lambda t: cli_error("experts", "combine", *map(str, svf_experts(t)), "--weights", "1e6", "-inf", "--out",
                             str(t / "mix")),
         CliFailed, "svdtune experts: error: the weight of expert 'expert1' is -inf; weights must be finite"),
    Case("experts with task heads and no head chosen",
         lambda t: cli_error("experts", "combine", *map(str, svf_experts(t, "bert-cls", train_also="^classifier")),
                             "--out", str(t / "mix")),
         CliFailed, "carry a task head trained in full .*choose the expert whose head the result keeps"),
    Case("CLI experts combine --weights nan nan",
         lambda t: cli_error("experts", "combine", *map(str, svf_experts(t)), "--weights", "nan", "nan", "--out",
                             str(t / "mix")),
         CliFailed, "svdtune experts: error: the weight of expert 'expert0' is nan"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gets_its_clear_error(case: Case, tmp_path: Path) -> None:
    with pytest.raises(case.error, match=case.match):
        case.act(tmp_path)


def test_overwriting_an_adapter_keeps_the_users_other_files(tmp_path: Path) -> None:
    path = saved(tmp_path)
    (path / "README.md").write_text("my notes")
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    svdtune.save_adapter(model, path, overwrite=True)
    assert (path / "README.md").read_text() == "my notes"
    assert svdtune.read_adapter_config(path)["method"] == "lora"
    load(path)  # a file the user added is not part of the manifest and does not stop a load


def test_a_name_pattern_that_runs_out_of_time_is_an_error(monkeypatch) -> None:
    """The time limit itself (the `regex` engine rarely needs it: it defuses most nested repetition on its own)."""
    from svdtune import patterns

    class Slow:
        def search(self, name: str, timeout: float) -> None:
            raise TimeoutError("regex time out")

    monkeypatch.setattr(patterns, "compile_pattern", lambda pattern, option: Slow())
    with pytest.raises(PatternError, match=r"targets='\(a\+\)\+' takes more than 1 s to match the name 'model"):
        svdtune.adapt(make_model(), "lora", targets="(a+)+")


def test_experts_with_task_heads_combine_keeping_the_chosen_head(tmp_path: Path) -> None:
    first, second = svf_experts(tmp_path, "bert-cls", train_also="^classifier")
    with contextlib.redirect_stdout(stdio.StringIO()):
        assert commands.main(["experts", "combine", str(first), str(second), "--head", str(second), "--out",
                         str(tmp_path / "mix")]) == 0
    mixed = load_file(tmp_path / "mix" / WEIGHTS_FILE)
    head = "train_also/classifier.weight"
    assert torch.equal(mixed[head], load_file(second / WEIGHTS_FILE)[head])
    model = svdtune.load_adapter(make_model("bert-cls"), tmp_path / "mix")
    assert model.classifier.weight.requires_grad


def test_cli_negative_weights_in_exponent_form_are_numbers() -> None:
    args = commands.build_parser().parse_args(["experts", "combine", "a", "b", "--weights", "1e6", "-1e6", "--out", "c"])
    assert args.weights == [1e6, -1e6]


@pytest.mark.parametrize("code, fix", [(28, "free some space or write elsewhere"),
                                       (27, "free some space, raise the file size limit"),
                                       (13, "fix the permissions")])
def test_a_failed_write_at_the_cli_is_one_line(monkeypatch, code: int, fix: str) -> None:
    import os

    where = "/runs/x/checkpoint/checkpoint.safetensors"

    def full(args) -> int:
        raise OSError(code, os.strerror(code), where)

    monkeypatch.setitem(commands.COMMANDS, "cache", full)
    with pytest.raises(CliFailed, match=f"svdtune cache: error: .*\\({where}\\); {fix}"):
        cli_error("cache")


def test_a_damaged_or_foreign_cache_entry_is_recomputed(tmp_path: Path) -> None:
    A = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    B = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    Factorizer(tmp_path).svd(A)
    Factorizer(tmp_path).svd(B)
    entry_a, entry_b = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    flip_a_bit(entry_a)
    entry_b.write_bytes(entry_a.read_bytes())  # B's entry now holds (damaged) factors of A
    for W in (A, B):
        factors = Factorizer(tmp_path)
        assert all(torch.equal(x, y) for x, y in zip(factors.svd(W), svd(W)))
        assert factors.misses == 1, "a bad entry must be recomputed"
    assert Factorizer(tmp_path).svd(A) is not None and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_an_unwritable_cache_warns_once_and_still_adapts(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    monkeypatch.setenv("SVDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(CacheWarning, match="cannot write its factor cache .* continuing without it") as caught:
        svdtune.adapt(make_model(), "pissa", r=2, verbose=False)
    assert len(caught) == 1


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    rows = load_rows(data_file(tmp_path, "d.csv", "\ufefftext,label\nfine,1\n".encode()), num_labels=2)
    assert rows == [{"text": "fine", "label": 1}]


def test_merge_leaves_a_tied_input_embedding_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    svdtune.adapt(model, "lora", targets="lm_head", r=2, verbose=False)
    with torch.no_grad():
        svdtune.adapters(model)["lm_head"].B.normal_()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        svdtune.merge(model)
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not model.config.tie_word_embeddings


def test_a_diverged_run_keeps_no_nan_checkpoint(tmp_path: Path) -> None:
    from svdtune.train.loop import TrainingDiverged, train

    model = svdtune.adapt(make_model("bert-cls"), "lora", r=2, train_also="^classifier", verbose=False)
    gen = torch.Generator().manual_seed(0)
    batches = iter(lambda: {"input_ids": torch.randint(0, 64, (4, 9), generator=gen),
                            "labels": torch.randint(0, 3, (4,), generator=gen)}, None)
    with pytest.raises(TrainingDiverged, match="nothing non-finite was saved"):
        train(model, batches, TrainConfig(steps=20, lr=1e9, head_lr=1e9, checkpoint_every=1, max_grad_norm=None),
              checkpoint_dir=tmp_path, progress=False)
    if (tmp_path / CHECKPOINT_FILE).exists():
        params = [v for k, v in load_file(tmp_path / CHECKPOINT_FILE).items() if k.startswith("param/")]
        assert all(torch.isfinite(p).all() for p in params), "a checkpoint with NaN/Inf parameters was kept"
