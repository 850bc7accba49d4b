"""What every benchmark script shares: configurations of svdtune and PEFT on one model, a training step, interleaved
timing, memory of one configuration in a process of its own, and the JSON + markdown result files.

A configuration is a label: "floor" (no adapter, every weight frozen, backward still runs through all activations),
an svdtune method name ("lora", "pissa", ...), or "peft:<init>" for Hugging Face PEFT's LoRA with that
`init_lora_weights` ("peft:lora" is PEFT's default init, "peft:pissa_niter_4", "peft:olora"), or "peft:adalora".
Every adapter targets the same seven llama projections at the same rank.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import svdtune
from svdtune.allocator import keep_freed_memory
from svdtune.bench.runner import environment
from svdtune.data.models import load_model
from svdtune.hardware import bf16_emulated, cpu_name
from svdtune.methods import rank_option

FLOOR = "floor"
PEFT_PREFIX = "peft:"
# Timed processes keep freed memory (svdtune.allocator), as svdtune's commands do: recorded with each result.
ALLOCATOR_SETTING = "freed memory kept (svdtune.allocator)"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(vocab_size: int, batch: int, seq: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def peft_model(model: nn.Module, init: str, r: int, total_steps: int = 1000) -> nn.Module:
    """PEFT's adapter on the same targets at the same rank and scale (alpha = r), dropout 0."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if init == "adalora":
        config = AdaLoraConfig(init_r=r, target_r=r // 2, lora_alpha=r, target_modules=LLAMA_TARGETS,
                               lora_dropout=0.0, total_step=total_steps, tinit=10, tfinal=10)
    else:
        config = LoraConfig(r=r, lora_alpha=r, target_modules=LLAMA_TARGETS, lora_dropout=0.0,
                            init_lora_weights=True if init == "lora" else init)
    return get_peft_model(model, config)


def prepare(model: nn.Module, config: str, r: int, cache: str | bool) -> tuple[nn.Module, int]:
    """`model` made ready to train as `config` (in place where the library allows); (model, trainable count)."""
    model.train()
    if config == FLOOR:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_())
        return model, 0
    if config.startswith(PEFT_PREFIX):
        model = peft_model(model, config[len(PEFT_PREFIX):], r)
    else:
        svdtune.adapt(model, config, cache=cache, verbose=False, progress=False, **rank_option(config, r))
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float) -> Callable[[], None]:
    """One training step: forward + backward, AdamW step, the method's per-step work (PEFT AdaLoRA's rank
    allocation), zero_grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    products = svdtune.bf16_products(model)  # a bf16 base on a CPU without bf16 units: float32 products, all alike

    def forward_backward() -> None:
        with products:
            model(**batch).loss.backward()

    if not trainable:
        return forward_backward
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    count = iter(range(1 << 62))

    def step() -> None:
        forward_backward()
        optimizer.step()
        if allocate is not None:
            allocate(next(count))
        optimizer.zero_grad()

    return step


def step_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Floating-point operations of one forward + backward of `model` on `batch`: the matrix products, as
    torch.utils.flop_counter counts them (element-wise work, AdamW and, on a CPU, the attention kernel are not
    counted, for the floor as for every adapter). A configuration's time over the floor's, divided by its FLOPs over
    the floor's, says how far it is from the limit of its own arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with svdtune.bf16_products(model), counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronized(step: Callable[[], None], device: str) -> Callable[[], None]:
    if not device.startswith("cuda"):
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize()

    return run


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, rounds: int,
                     per_round: int) -> dict[str, list[float]]:
    """Seconds of every timed call, by configuration: A B C A B C ... so that machine drift hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round):
                start = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


# --- memory ---------------------------------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current RSS, VmHWM: peak RSS since the last reset), MB."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    return kb / 1024


def reset_peak(device: str) -> float:
    """Start a peak-memory window; returns the memory in use now, MB (RSS on CPU, allocated on CUDA).

    CPU (Linux, glibc): freed heap memory is given back first (malloc_trim), else memory freed while loading hides
    the steps' own allocations, then the peak RSS (VmHWM) is reset through /proc/self/clear_refs.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0
    return status_mb("VmRSS")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mb("VmHWM")


def step_memory(model: nn.Module, args: Any) -> dict[str, float]:
    """Peak memory of `args.warmup` training steps of a prepared `model` (after one step that allocates the optimizer
    state: part of the peak, not of the rest), MB; `args` carries batch, seq, seed, lr, warmup and device."""
    step = make_step(model, make_batch(model.config.vocab_size, args.batch, args.seq, args.seed, args.device), args.lr)
    step()
    before = reset_peak(args.device)
    for _ in range(args.warmup):
        step()
    peak = peak_mb(args.device)
    return {"peak_mb": round(peak, 1), "at_rest_mb": round(before, 1), "growth_mb": round(peak - before, 1)}


def run_isolated(script: str, arguments: Sequence[str]) -> dict[str, Any]:
    """Run `script` in a fresh Python process and parse the JSON object on its last stdout line."""
    done = subprocess.run([sys.executable, script, *arguments], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(arguments)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# --- a step benchmark: the shared flow of step_time.py and svf_svft_step.py ------------------------------------------
Prepare = Callable[[nn.Module, str, str], tuple[nn.Module, int]]  # (model, configuration, cache) -> (model, trainable)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_smollm2(device: str, dtype: str = "float32") -> nn.Module:
    model, _ = load_model("smollm2-135m")
    return model.to(device, DTYPES[dtype])


def step_parser(description: str, *, warmup: int, rounds: int, out: str) -> argparse.ArgumentParser:
    """The options every step benchmark takes, plus the internal ones of its memory subprocess (--only, --cache)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration in each round")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the base model's weights")
    parser.add_argument("--out", default=out)
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one configuration's memory
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    return parser


def step_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a step benchmark records with its results."""
    return {"model": "smollm2-135m", "dtype": args.dtype, "device": args.device, "batch": args.batch, "seq": args.seq,
            "warmup": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps,
            "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0}, "seed": args.seed,
            "allocator": ALLOCATOR_SETTING, "bf16_products": products_setting(args.dtype, args.device)}


def products_setting(dtype: str, device: str) -> str:
    """How a benchmark's products ran, as its settings record it (`svdtune.bf16_products`)."""
    emulated = dtype == "bfloat16" and bf16_emulated(device)
    return "float32 products of the bf16 values (svdtune.upcast: no bf16 units)" if emulated else "native"


def run_step_benchmark(script: str, args: argparse.Namespace, configs: Sequence[str], prepare: Prepare,
                       forwarded: Sequence[str] = ()) -> tuple[dict[str, int], dict[str, list[float]], dict,
                                                              dict[str, int]] | None:
    """Time every configuration's training step interleaved in this process, then measure each one's memory in a
    fresh process of `script` (`--only`, which gets `forwarded` options too); returns (trainable, seconds, memory,
    flops of one forward + backward, `step_flops`).
    In such a subprocess: print that configuration's memory as JSON and return None."""
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache or temporary
        if args.only:
            model, trainable = prepare(load_smollm2(args.device, args.dtype), args.only, cache)
            print(json.dumps({**step_memory(model, args), "trainable": trainable}))
            return None
        keep_freed_memory()  # steps timed as `svdtune train` runs them (memory runs keep the allocator's defaults)
        base = load_smollm2(args.device, args.dtype)
        batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.seed, args.device)
        trainable, steps, flops = {}, {}, {}
        for config in configs:
            model, trainable[config] = prepare(copy.deepcopy(base), config, cache)
            flops[config] = step_flops(model, batch)
            steps[config] = synchronized(make_step(model, batch, args.lr), args.device)
        del base, model
        seconds = time_interleaved(steps, args.warmup, args.rounds, args.steps)
        del steps
        for config, median in medians(seconds).items():  # the timings now, in case the memory runs are cut short
            print(f"{config}: median step {median:.3f} s", flush=True)
        memory = {}
        for config in configs:
            options = ["--only", config, "--cache", cache, "--device", args.device, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--warmup", str(args.warmup), "--seed", str(args.seed),
                       "--lr", str(args.lr), "--dtype", args.dtype, *forwarded]
            memory[config] = run_isolated(script, options)
            print(config, json.dumps(memory[config]), flush=True)
    return trainable, seconds, memory, flops


# --- results --------------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(out: str, benchmark: str, settings: dict[str, Any], results: Any, table: str) -> None:
    """benchmarks/results/<name>.json (settings, versions, git sha, machine, results) and <name>.md (the table)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = settings.get("device", "cpu")
    record = {"benchmark": benchmark, **settings, **environment(), "device_name": device_name(device),
              "results": results}
    path.write_text(json.dumps(record, indent=2) + "\n")
    path.with_suffix(".md").write_text(table)
    print("\n" + table)
