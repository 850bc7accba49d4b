"""Write benchmarks/RESULTS.md from the committed results: one section per benchmark, its command, the machine and
versions it ran on, and the table (ratios first) each script wrote next to its JSON.

    python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SECTIONS = (
    ("step_time", "Training step: svdtune vs PEFT vs the frozen floor", "python benchmarks/step_time.py"),
    ("step_time_lora", "Training step, float32: LoRA vs PEFT vs the frozen floor, SVF and SVFT against their FLOP floor",
     "python benchmarks/step_time.py --configs floor lora peft:lora svf svft --rounds 3"),
    ("step_time_bf16", "Training step on a bf16 base: svdtune vs PEFT vs the frozen floor, SVF and SVFT vs LoRA",
     "python benchmarks/step_time.py --dtype bfloat16 --configs floor lora peft:lora svf svft --rounds 3"),
    ("step_time_bf16_no_bf16_units", "Training step on a bf16 base, on a CPU without bf16 matrix units (every "
     "configuration's products as float32 products of the bf16 values, `svdtune.bf16_products`)",
     "python benchmarks/step_time.py --dtype bfloat16 --configs floor lora peft:lora svf svft --rounds 3 "
     "--out benchmarks/results/step_time_bf16_no_bf16_units.json"),
    ("step_time_bf16_2048_tokens", "Training step on a bf16 base at 2048 tokens per step: LoRA vs PEFT vs the frozen "
     "floor", "python benchmarks/step_time.py --dtype bfloat16 --configs floor lora peft:lora --batch 4 --seq 512 "
     "--rounds 2 --out benchmarks/results/step_time_bf16_2048_tokens.json"),
    ("step_time_2048_tokens", "Training step, float32, at 2048 tokens per step: LoRA vs the frozen floor",
     "python benchmarks/step_time.py --configs floor lora --batch 4 --seq 512 --rounds 2 "
     "--out benchmarks/results/step_time_2048_tokens.json"),
    ("rank_path_bandwidth", "LoRA's rank-r products one by one, bf16: time and memory bandwidth against a copy",
     "python benchmarks/rank_path_bandwidth.py"),
    ("rank_path_bandwidth_float32", "LoRA's rank-r products one by one, float32: time and memory bandwidth against "
     "a copy", "python benchmarks/rank_path_bandwidth.py --dtype float32 "
     "--out benchmarks/results/rank_path_bandwidth_float32.json"),
    ("rank_path_bandwidth_cold", "LoRA's rank-r products one by one, bf16, every operand out of the caches",
     "python benchmarks/rank_path_bandwidth.py --cold --out benchmarks/results/rank_path_bandwidth_cold.json"),
    ("rank_path_bandwidth_2048_tokens", "LoRA's rank-r products one by one, bf16, 2048 tokens per step",
     "python benchmarks/rank_path_bandwidth.py --tokens 2048 "
     "--out benchmarks/results/rank_path_bandwidth_2048_tokens.json"),
    ("init_time", "Initialisation: SVD/QR inits, cold and warm cache, vs PEFT; one-matrix scaling",
     "python benchmarks/init_time.py"),
    ("inference", "Inference: base vs unmerged vs merged, vs PEFT", "python benchmarks/inference.py"),
    ("inference_bf16", "Inference on a bf16 base: base vs unmerged vs merged, vs PEFT",
     "python benchmarks/inference.py --dtype bfloat16 --rounds 5 --out benchmarks/results/inference_bf16.json"),
    ("generation_overhead", "Unmerged generation: the adapter calls' own cost vs their rank-r products",
     "python benchmarks/generation_overhead.py"),
    ("generation_overhead_compiled", "Unmerged generation through torch.compile (static cache)",
     "python benchmarks/generation_overhead.py --compile "
     "--out benchmarks/results/generation_overhead_compiled.json"),
    ("svf_svft_step", "SVF and SVFT: step time and memory vs LoRA, vs the dense rebuild, vs keeping U and V",
     "python benchmarks/svf_svft_step.py"),
    ("adaptive", "Adaptive rank: parameter counts, the cost of importance scoring vs LoRA, ALoRA's ablation round",
     "python benchmarks/adaptive.py"),
    ("svf_svft_step_bf16", "SVF and SVFT on a bf16 base: step time and memory",
     "python benchmarks/svf_svft_step.py --dtype bfloat16"),
    ("svf_svft_update_error_bf16", "SVF and SVFT on a bf16 base: relative error of the update",
     "python benchmarks/svf_svft_step.py --dtype bfloat16 --errors-only"),
    ("llm_speed", "Causal-LM suite: packed scoring, the LM head at answer positions, bf16 base",
     "python benchmarks/llm_speed.py"),
    ("bench_jobs", "`svdtune bench --jobs`: a suite's configurations one at a time vs several at a time",
     "python benchmarks/bench_jobs.py"),
)


def section(results: Path, name: str, title: str, command: str) -> str:
    record = json.loads((results / f"{name}.json").read_text())
    units = record.get("bf16_units")
    bf16 = "" if units is None else f", bf16 units: {', '.join(units) or 'none'}"
    machine = (f"{record.get('processor') or record.get('device_name', 'unknown')}{bf16} ({record['device']}, "
               f"{record['threads']} threads, settings {settings_of(record)}); "
               f"torch {record['torch']}, transformers {record['transformers']}, svdtune {record['svdtune']} "
               f"at {record['git_sha'][:10]}")
    table = (results / f"{name}.md").read_text().replace("](", "](results/")
    return f"## {title}\n\n`{command}` — {machine}, {record['wall_seconds']} s.\n\n{table}\n"


def settings_of(record: dict) -> str:
    """The run's own options (what its script was called with), for the section header."""
    skip = {"benchmark", "results", "device", "device_name", "threads", "git_sha", "svdtune", "torch", "transformers",
            "python", "machine", "processor", "bf16_units", "cpus", "wall_seconds"}
    return ", ".join(f"{k}={v}" for k, v in record.items() if k not in skip) or "defaults"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    args = parser.parse_args()
    results = Path(args.results)
    parts = ["# Benchmark results\n\nGenerated by `python benchmarks/report.py` from `benchmarks/results/*.json`; "
             "every table comes from one run of its script, with configurations interleaved so that machine drift "
             "cancels in the ratios. Each section names the processor it ran on; the CPU's bf16 matrix units "
             "(AMX/AVX-512 BF16 on recent Xeons) are what make the bf16 rows faster. Regenerate after re-running a "
             "script.\n"]
    parts += [section(results, name, title, command) for name, title, command in SECTIONS
              if (results / f"{name}.json").exists()]
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
