"""The `svdtune` command: a dict of small typed functions, one per subcommand; `main(argv)` is callable from tests."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..allocator import keep_freed_memory
from ..atomic import check_replaceable, file_sha256, write_directory
from ..bench.suites import SUITES
from ..data.tasks import TASKS
from ..errors import UserError
from ..inject import merge, split_name
from ..io import holds_adapter, load_adapter, read_adapter, read_adapter_config, save_adapter
from ..linalg import default_cache_dir
from ..methods import METHODS, get_method, rank_option
from ..paths import check_creatable
from ..train.runrecord import read_record, refuse_changes, write_record


def format_options(config: object) -> str:
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every registered method: paper, ΔW formula, trainable parameters per m x n matrix, defaults."""
    for name, cls in METHODS.items():
        print(f"{name}\n  paper      {cls.paper}\n  update     {cls.delta_formula}\n"
              f"  trainable  {cls.params_formula} per m×n matrix\n  defaults   {format_options(cls.Config())}\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a saved adapter without loading a model: method, config, base fingerprint, sizes per module type."""
    path = Path(args.adapter)
    saved = read_adapter(path)
    meta = saved.meta
    cls = get_method(meta["method"])
    modules = meta["modules"]
    stored = sum(t.numel() for t in saved.tensors.values())
    megabytes = sum(t.numel() * t.element_size() for t in saved.tensors.values()) / 1e6
    dtypes = sorted({m["base_dtype"] for m in modules.values()})
    print(f"adapter     {path}\n"
          f"method      {cls.name}: {cls.paper}\n"
          f"update      {cls.delta_formula}\n"
          f"config      {', '.join(f'{k}={v!r}' for k, v in meta['config'].items())}\n"
          f"made by     svdtune {meta.get('svdtune_version')}, torch {meta.get('torch_version')}, "
          f"{meta.get('created')}\n"
          f"base        fingerprint {meta.get('base_fingerprint')}, {len(modules)} modules, {'/'.join(dtypes)}\n"
          f"targets     {meta.get('targets')}\n"
          f"trainable   {meta.get('trainable_parameters', 0):,} parameters ({cls.params_formula} per m×n matrix)\n"
          f"stored      {stored:,} values, {megabytes:.2f} MB of tensors")
    for name, info in meta.get("train_also", {}).items():
        print(f"train_also  {name} {'×'.join(map(str, info['shape']))} {info['dtype']} (trained in full, saved here)")
    kinds = Counter((split_name(n)[0], tuple(m["shape"])) for n, m in modules.items())
    print("modules     count  shape (out×in)")
    for (kind, (m, n)), count in sorted(kinds.items()):
        print(f"  {kind:<28}{count:>5}  {m}×{n}")
    if all("mask" in m["tensors"] for m in modules.values()):  # adaptive rank: what survived pruning
        from ..allocate import rank_table

        final = {name: int(saved.module_tensors(name)["mask"].sum()) for name in modules}
        print(f"ranks       {sum(final.values())} active in all; per module type: total, then by layer")
        for line in rank_table(final):
            print(f"  {line}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Show where the SVD/QR factor cache is and how big it is; --clear empties it."""
    root = default_cache_dir()
    entries = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    size = sum(p.stat().st_size for p in entries)
    if args.clear:
        for p in entries:
            p.unlink()
        print(f"removed {len(entries)} cached factorisations ({size / 1e6:.1f} MB) from {root}")
    else:
        print(f"{root}: {len(entries)} cached factorisations, {size / 1e6:.1f} MB (set SVDTUNE_CACHE_DIR to move it)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Every registered method head to head at matched budgets on a real model and data: table + Pareto plot."""
    from ..bench.runner import run_suite  # imports the model stack only when needed

    suite = SUITES[args.suite]
    changes = {"seeds": tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None,
               "steps": args.steps, "methods": tuple(args.methods.split(",")) if args.methods else None}
    suite = dataclasses.replace(suite, **{k: v for k, v in changes.items() if v is not None})
    from ..train.references import is_reference

    for name in suite.methods:
        if not is_reference(name):
            get_method(name)
    out = Path(args.out) / suite.name
    check_creatable(out)
    if args.report_only:
        from ..bench.runner import write_report

        if not (out / "results.json").is_file():
            raise FileNotFoundError(f"--report-only needs {out / 'results.json'}: run the suite first")
        write_report(json.loads((out / "results.json").read_text()), out)
    else:
        from ..bench.parallel import auto_jobs

        run_suite(suite, out, resume=not args.fresh, jobs=auto_jobs() if args.jobs == "auto" else int(args.jobs))
    print((out / "leaderboard.md").read_text())
    plots = out if len(suite.tasks) == 1 else out / "<task>"
    print(f"results: {out / 'results.json'}, plots: {plots / 'pareto.png'}, {plots / 'delta.png'}")
    return 0


def jobs_value(text: str) -> str:
    """`--jobs`: "auto" or a positive count."""
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a count of at least 1, got {text!r}")
    return text


def parse_options(pairs: Sequence[str]) -> dict[str, object]:
    """`--option niter=4 --option rslora=true` -> {"niter": 4, "rslora": True} (JSON values, else strings)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option {pair!r} must look like name=value, e.g. --option niter=4")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune with one method (a classifier, or a causal LM on a benchmark); write adapter, metrics, loss curve."""
    from ..allocate import AllocationConfig
    from ..data.tasks import CLASSIFICATION, get_task, user_task  # imports the model stack only when needed
    from ..train.checkpoint import CHECKPOINT_FILE
    from ..train.loop import TrainConfig, plot_losses, plot_rank_allocation
    from ..train.recipes import fine_tune, hits, load_classifier

    out = Path(args.out)
    check_creatable(out)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise FileExistsError(f"{out} already exists and is not empty; pass --resume to continue its run, "
                              "--overwrite to start over, or choose another --out")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    options = {**rank_option(args.method, args.r), **parse_options(args.option)}
    task = user_task(args.data, args.eval_data, num_labels=args.num_labels) if args.data else get_task(args.task)
    kind = task.kind
    # --bf16: a causal LM's frozen base held in bf16 (fast on bf16 matrix units); a classifier autocasts instead.
    base_bf16 = args.bf16 and kind != CLASSIFICATION
    autocast = "bf16" if args.bf16 and not base_bf16 else "fp16" if args.fp16 else "no"
    allocation = AllocationConfig(**parse_options(args.allocation))
    config = TrainConfig(steps=args.steps, lr=args.lr, head_lr=args.head_lr, checkpoint_every=args.checkpoint_every,
                         mixed_precision=autocast, allocation=allocation)
    model_name = args.model or task.model
    metrics, checkpoints = out / "metrics.jsonl", out / "checkpoint"
    record = train_record(args)
    if args.resume and (checkpoints / CHECKPOINT_FILE).exists():
        refuse_changes(read_record(checkpoints), record, checkpoints, "start over with --overwrite, or choose "
                       "another --out")
    else:
        metrics.unlink(missing_ok=True)
        (checkpoints / CHECKPOINT_FILE).unlink(missing_ok=True)
        write_record(checkpoints, record)
    data = task.load()
    max_length = args.max_length or task.max_length
    load = functools.partial(load_classifier, num_labels=args.num_labels) if kind == CLASSIFICATION else None
    run = fine_tune(model_name, data[0], task, args.method, options, config, seed=args.seed,
                    batch_size=args.batch_size, max_length=max_length, precision="bf16" if base_bf16 else "float32",
                    cache=True, metrics_path=metrics, checkpoint_dir=checkpoints, load=load)
    outcome = hits(run.model, run.tokenizer, data[1][:args.eval_size], kind, max_length)
    score = sum(outcome) / len(outcome)
    save_adapter(run.model, out / "adapter", overwrite=args.overwrite or args.resume)
    plot_losses(metrics, out / "loss")
    allocation = plot_rank_allocation(run.model, out / "ranks")
    print(f"{args.method} on {task.name}: {task.metric} {100 * score:.1f}% on the held-out split, "
          f"{run.trainable:,} adapter parameters, {run.training.seconds:.0f} s of training\n"
          f"adapter: {out / 'adapter'}, metrics: {metrics}, loss curve: {out / 'loss.png'}"
          + (f", rank allocation: {allocation}" if allocation else ""))
    return 0


TRAIN_RUN_FLAGS = ("method", "r", "option", "allocation", "model", "task", "data", "eval_data", "num_labels",
                   "steps", "lr", "head_lr", "batch_size", "seed", "max_length", "bf16", "fp16")


def train_record(args: argparse.Namespace) -> dict[str, object]:
    """The `svdtune train` options that shape a run, by flag (a resume must repeat them); data files by content."""
    record: dict[str, object] = {}
    for name in TRAIN_RUN_FLAGS:
        value = getattr(args, name)
        if name in ("option", "allocation"):
            value = parse_options(value)
        elif name in ("data", "eval_data") and value and Path(value).is_file():
            value = f"sha256:{file_sha256(Path(value))}"
        elif name == "task" and args.data:
            value = None
        record[f"--{name.replace('_', '-')}"] = value
    return record


def load_adapted(adapter: Path, model_name: str) -> tuple[object, object]:
    """The base model `model_name` (embedded name or directory) with the adapter at `adapter` loaded into it."""
    from ..data.models import load_model

    meta = read_adapter_config(adapter)
    head = meta.get("train_also", {}).get("classifier.weight")
    model, tokenizer = load_model(model_name, num_labels=head["shape"][0] if head else None)
    load_adapter(model, adapter)
    return model, tokenizer


def cmd_export_lora(args: argparse.Namespace) -> int:
    """Write an adapter as a PEFT LoRA adapter on the original base (exact for low-rank methods, or --rank k)."""
    from ..export import export_lora

    check_replaceable(Path(args.out), overwrite=args.overwrite)  # before the model loads
    model, _ = load_adapted(Path(args.adapter), args.model)
    errors = export_lora(model, Path(args.out), rank=args.rank, energy=args.energy, overwrite=args.overwrite,
                         layout=args.layout, max_lora_rank=args.max_lora_rank)
    worst = max(errors, key=errors.get)
    served = json.loads((Path(args.out) / "adapter_config.json").read_text())["r"]
    print(f"wrote a PEFT LoRA adapter to {args.out} ({len(errors)} modules, {args.layout} layout, r={served}); "
          + ("exact" if errors[worst] == 0 else f"largest relative error {errors[worst]:.2e} in {worst}")
          + (f"; vLLM: --enable-lora --max-lora-rank {served}" if args.layout == "serving" else ""))
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Write an adapter as a llama.cpp GGUF LoRA adapter for its base model's GGUF file, or (--merged) the whole model
    with the adapter folded in (Ollama, LM Studio, llama-cpp-python)."""
    from ..data.models import gguf_file
    from ..export_gguf import check_output_file, export_gguf, export_merged_gguf

    out = Path(args.out)
    if args.merged and (args.rank is not None or args.energy is not None):
        raise ValueError("a merged model holds every update exactly; --rank and --energy are for adapters only")
    check_output_file(out, overwrite=args.overwrite)  # before anything loads
    base = Path(args.gguf) if args.gguf else gguf_file(args.model)
    if base is None:
        raise ValueError(f"{args.model} is not loaded from a GGUF file; pass --gguf with the GGUF file of this base "
                         "model (the one llama.cpp will run)")
    model, _ = load_adapted(Path(args.adapter), args.model)
    if args.merged:
        replaced = export_merged_gguf(model, out, base=base, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote the merged model to {out} ({replaced} {args.dtype.upper()} weights replaced in a copy of "
              f"{base.name})\nrun it with llama.cpp: llama-cli -m {out}")
        return 0
    errors = export_gguf(model, out, base=base, rank=args.rank, energy=args.energy, overwrite=args.overwrite)
    worst = max(errors, key=errors.get)
    print(f"wrote a GGUF LoRA adapter to {out} ({len(errors)} tensor pairs, for {base.name}); "
          + ("exact" if errors[worst] == 0 else f"largest relative error {errors[worst]:.2e} in {worst}")
          + f"\nrun it with llama.cpp: llama-cli -m {base} --lora {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base and write a plain Hugging Face model directory (no svdtune needed to load it)."""
    out = Path(args.out)
    if holds_adapter(out):
        raise FileExistsError(f"{out} holds an svdtune adapter, which the merged model would replace; choose "
                              "another --out")
    check_replaceable(out, overwrite=args.overwrite)
    model, tokenizer = load_adapted(Path(args.adapter), args.model)
    merge(model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_directory(out, fill)
    print(f"wrote the merged model to {out}; load it with transformers' from_pretrained")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    """Singular values of a model's target matrices: statistics per module type and layer, plots, JSON."""
    from ..analysis.spectrum import adapter_report, model_spectra, plot_spectra, summarize, table
    from ..data.models import load_model

    band = (args.band[0], args.band[1])
    out = Path(args.out)
    check_creatable(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.adapter:
        model, _ = load_adapted(Path(args.adapter), args.model)
    else:
        model, _ = load_model(args.model)
    spectra = model_spectra(model, targets=args.targets)
    summary = summarize(spectra, band=band, top_r=args.top_r)
    if args.adapter:
        summary["adapter"] = adapter_report(model, k=args.top_r)
    (out / "spectrum.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_spectra(spectra, out / "spectrum", band=band)
    print(table(summary))
    if args.adapter:
        a = summary["adapter"]
        print(f"adapter: mean cosine of ΔW's top-{args.top_r} directions with W's top-{args.top_r} "
              f"{a['mean_cos_top']:.3f}, with its bottom-{args.top_r} {a['mean_cos_bottom']:.3f}; "
              f"intruder dimensions {a['intruders']}")
    print(f"written: {out / 'spectrum.json'}, {out / 'spectrum.png'}, {out / 'spectrum.svg'}")
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    """SVF experts: `combine A B --weights 0.7 0.3 --out C` writes 1 + Σ w_k (z_k − 1) as an ordinary adapter."""
    from ..experts.arithmetic import combine, load_expert, save_expert

    out = Path(args.out)
    check_replaceable(out, overwrite=args.overwrite)
    weights = args.weights or [1.0 / len(args.adapters)] * len(args.adapters)
    experts = [load_expert(path) for path in args.adapters]
    label = " + ".join(f"{w:g}·{e.name}" for w, e in zip(weights, experts))
    head = None
    if args.head is not None:
        given = [Path(a).resolve() for a in args.adapters]
        if Path(args.head).resolve() not in given:
            raise ValueError(f"--head {args.head} is not one of the adapters being combined")
        head = given.index(Path(args.head).resolve())
    save_expert(combine(experts, weights, name=label, head=head), out, overwrite=args.overwrite)
    print(f"wrote {label} to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """End-to-end on the embedded SmolLM2-135M: adapt, train a few steps on real sentences, save/load, merge."""
    from .demo import run_demo  # imports the model stack only when needed

    check_creatable(Path(args.out))
    return run_demo(method=args.method, r=args.r, steps=args.steps, out=Path(args.out))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "methods": cmd_methods, "info": cmd_info, "cache": cmd_cache, "train": cmd_train, "bench": cmd_bench,
    "export-lora": cmd_export_lora, "export-gguf": cmd_export_gguf, "merge": cmd_merge,
    "spectrum": cmd_spectrum,
    "experts": cmd_experts,
    "demo": cmd_demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdtune", description="Fine-tune language models beyond LoRA.")
    parser.add_argument("--version", action="version", version=f"svdtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help=cmd_methods.__doc__)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("adapter", help="adapter directory written by svdtune.save_adapter")
    cache = sub.add_parser("cache", help=cmd_cache.__doc__)
    cache.add_argument("--clear", action="store_true", help="delete every cached factorisation")
    add_train(sub)
    add_bench(sub)
    add_export_and_merge(sub)
    add_analysis_and_demo(sub)
    return parser


def add_train(sub: argparse._SubParsersAction) -> None:
    """`svdtune train`: method, data, schedule, output, precision."""
    train = sub.add_parser("train", help=cmd_train.__doc__)
    train.add_argument("--method", required=True, choices=list(METHODS))
    train.add_argument("--r", type=int, default=8, help="rank, for methods that have one (default 8)")
    train.add_argument("--option", action="append", default=[], help="another method option, name=value")
    train.add_argument("--allocation", action="append", default=[], help="rank schedule of adalora/lora2/alora, "
                       "name=value (target_rank, t_init, t_final, interval, rounds, ...)")
    train.add_argument("--model", help="embedded model name or local directory (default: the task's own, " + ", ".join(
                       sorted({f"{task.model} for {task.kind}" for task in TASKS.values()})) + "; --data: "
                       f"{TASKS['movie-reviews'].model})")
    train.add_argument("--task", default="movie-reviews", choices=list(TASKS),
                       help="embedded data set, trained on a seeded 80%% split: " + "; ".join(
                           f"{name}: {task.description.replace('%', '%%')} ({task.kind})" for name, task in TASKS.items()))
    train.add_argument("--data", help="your own .jsonl/.csv of {text, label} rows instead (80/20 seeded split)")
    train.add_argument("--eval-data", help="held-out .jsonl/.csv for --data (default: split off --data)")
    train.add_argument("--num-labels", type=int, default=2, help="classes in --data (labels 0..N-1)")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate (default 1e-3)")
    train.add_argument("--head-lr", type=float, default=1e-2, help="task-head learning rate (default 1e-2)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-size", type=int, help="score only the first N held-out examples (default: all)")
    train.add_argument("--out", required=True, help="output directory (adapter/, metrics.jsonl, loss.png)")
    train.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    train.add_argument("--max-length", type=int, help="tokens per example (default: the task's own, " + ", ".join(
                       sorted({f"{task.max_length} for {task.kind}" for task in TASKS.values()})) + ")")
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16: a causal LM's frozen base held in bf16, "
                           "adapters and optimizer state float32 (CPUs and GPUs with bf16 units); a classifier "
                           "autocasts")
    precision.add_argument("--fp16", action="store_true", help="fp16 autocast with loss scaling (GPUs only)")


def add_bench(sub: argparse._SubParsersAction) -> None:
    """`svdtune bench`: the suite and what of it to run."""
    bench = sub.add_parser("bench", help=cmd_bench.__doc__)
    bench.add_argument("--suite", default="default", choices=list(SUITES),
                       help="; ".join(f"{name}: {suite.description}" for name, suite in SUITES.items()))
    bench.add_argument("--methods", help="comma-separated subset of methods (default: all registered)")
    bench.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    bench.add_argument("--steps", type=int, help="optimizer steps per run (default: the suite's)")
    bench.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    bench.add_argument("--fresh", action="store_true", help="ignore finished runs in the output directory")
    bench.add_argument("--jobs", default="auto", type=jobs_value,
                       help="configurations trained at a time, each in its own process with its share of the threads "
                            "(default auto: one per core, at most 4 and one per 4 GB of memory)")
    bench.add_argument("--report-only", action="store_true",
                       help="write the leaderboard and plots from the finished runs in --out, training nothing")


def add_export_and_merge(sub: argparse._SubParsersAction) -> None:
    """`svdtune export-lora` and `svdtune merge`: adapters for other stacks."""
    export = sub.add_parser("export-lora", help=cmd_export_lora.__doc__)
    export.add_argument("adapter", help="adapter directory written by svdtune")
    export.add_argument("--model", required=True, help="its base model: embedded name or local directory")
    export.add_argument("--out", required=True, help="output directory for the PEFT adapter")
    export.add_argument("--rank", type=int, help="truncate every update to this rank (needed for full-rank methods)")
    export.add_argument("--energy", type=float, help="or truncate each update to keep this fraction of its energy")
    export.add_argument("--layout", choices=["serving", "per-module"], default="serving",
                        help="serving (default): one rank and scale for every module, what vLLM and other servers "
                        "read right; per-module: each module's own rank and scale (rank_pattern), PEFT only")
    export.add_argument("--max-lora-rank", type=int, help="the server's rank limit (vLLM --max-lora-rank), checked")
    export.add_argument("--overwrite", action="store_true")
    gguf = sub.add_parser("export-gguf", help=cmd_export_gguf.__doc__)
    gguf.add_argument("adapter", help="adapter directory written by svdtune")
    gguf.add_argument("--model", required=True, help="its base model: embedded name or local directory")
    gguf.add_argument("--gguf", help="the base model's GGUF file (default: the one --model is loaded from)")
    gguf.add_argument("--out", required=True, help="output .gguf file")
    gguf.add_argument("--rank", type=int, help="truncate every update to this rank (needed for full-rank methods)")
    gguf.add_argument("--energy", type=float, help="or truncate each update to keep this fraction of its energy")
    gguf.add_argument("--merged", action="store_true",
                      help="write the whole model with the adapter folded in (exact for every method), not an adapter")
    gguf.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="with --merged: the merged weights' type")
    gguf.add_argument("--overwrite", action="store_true")
    merged = sub.add_parser("merge", help=cmd_merge.__doc__)
    merged.add_argument("adapter", help="adapter directory written by svdtune")
    merged.add_argument("--model", required=True, help="its base model: embedded name or local directory")
    merged.add_argument("--out", required=True, help="output directory for the merged model")
    merged.add_argument("--overwrite", action="store_true")


def add_analysis_and_demo(sub: argparse._SubParsersAction) -> None:
    """`svdtune spectrum`, `svdtune experts`, `svdtune demo`."""
    spectrum = sub.add_parser("spectrum", help=cmd_spectrum.__doc__)
    spectrum.add_argument("model", help="embedded model name or local directory")
    spectrum.add_argument("--targets", help="regex on module names (default: the architecture's adapter targets)")
    spectrum.add_argument("--band", type=float, nargs=2, default=[0.1, 1.1], help="σ band to report (0.1 1.1)")
    spectrum.add_argument("--top-r", type=int, default=8, help="r for the top-r energy and the adapter angles")
    spectrum.add_argument("--adapter", help="also analyse how this adapter moved the spectrum")
    spectrum.add_argument("--out", default="runs/spectrum", help="output directory (default runs/spectrum)")
    experts = sub.add_parser("experts", help=cmd_experts.__doc__).add_subparsers(dest="action", required=True)
    combine = experts.add_parser("combine", help="weighted sum of SVF experts' offsets (z − 1) on the same base")
    combine.add_argument("adapters", nargs="+", help="SVF adapter directories trained on the same base model")
    combine.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default: the average)")
    # argparse (before Python 3.13) reads "-1e6" or "-inf" as an unknown option, not a negative weight
    combine._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")
    combine.add_argument("--out", required=True, help="directory for the combined adapter")
    combine.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    combine.add_argument("--head", help="for experts trained with a task head (svdtune train): the adapter whose "
                         "head the result keeps")
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--method", default="pissa", choices=list(METHODS))
    demo.add_argument("--r", type=int, default=8, help="rank (default 8)")
    demo.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6)")
    demo.add_argument("--out", default="runs/demo", help="where the adapter is written (default runs/demo)")


def describe(error: BaseException) -> str:
    """A user error as one line: the message, and for a failed file operation the path and what to do."""
    if isinstance(error, OSError) and not isinstance(error, (FileExistsError, FileNotFoundError)) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        fix = {errno.ENOSPC: "free some space or write elsewhere",
               errno.EFBIG: "free some space, raise the file size limit, or write elsewhere",
               errno.EDQUOT: "free some space or write elsewhere",
               errno.EACCES: "fix the permissions or write elsewhere", errno.EROFS: "write to a writable location",
               errno.EISDIR: "a directory is in the way: choose another path",
               errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
               errno.EEXIST: "a file is in the way: choose another path"}.get(error.errno, "check the path")
        return f"{error.strerror}{where}; {fix}"
    return " ".join(str(error).split()) or type(error).__name__


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    return f"svdtune: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = one_line_warning
    keep_freed_memory()  # training steps reuse their memory instead of faulting it in again (`allocator`)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, UserError) as e:  # AdapterFileError, DataFileError, ResumeMismatch, disk full, ...
        print(f"svdtune {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
