"""The training loop, on HF Accelerate: the same code runs on one CPU, one GPU, or under `accelerate launch`/torchrun.

AdamW with linear warmup and cosine decay, gradient accumulation, gradient clipping, each adapter's `extra_loss()`
(regularisers) added to the loss, a progress bar with loss and tokens/s, a metrics JSONL, and a guard that stops
with a clear message when the loss turns NaN/Inf instead of training on garbage. svdtune writes no distributed code:
Accelerate prepares the model, optimizer and scheduler.

Mixed precision (`mixed_precision="bf16"` or `"fp16"`) is Accelerate's autocast around the model's forward: the
adapter parameters and AdamW state stay float32, the matrix products run in the low precision, and the prepared
model keeps autocasting afterwards (evaluation too). bf16 works on CPUs and recent GPUs; fp16 needs a GPU (on a CPU
Accelerate would silently ignore it, so it is an error here). An fp16 run's loss-scaler state is not checkpointed:
exact resume holds for float32 and bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..allocate import AllocationConfig, build_allocator, plot_ranks, ranks
from ..core import regularisation
from ..data.causal_lm import real_tokens
from ..errors import UserError
from ..hardware import slow_bf16_warning
from ..inject import adapters, extra_trainable
from ..upcast import bf16_products
from .checkpoint import CHECKPOINT_FILE, Progress, load_checkpoint, read_extra, save_checkpoint
from .measure import PeakMemory


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or Inf."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps
    lr: float = 1e-3  # peak learning rate of the adapter parameters
    head_lr: float | None = None  # learning rate of train_also parameters (a task head); None: same as lr
    warmup_ratio: float = 0.06  # fraction of steps with linear warmup, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay (0: decay shrinks PiSSA's principal directions)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # gradient clipping; None disables it
    log_every: int = 10  # steps between metrics lines
    checkpoint_every: int = 50  # steps between checkpoints (when train() is given a checkpoint directory)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16": autocast through Accelerate
    allocation: AllocationConfig = AllocationConfig()  # rank schedule of adaptive-rank methods (adalora, lora2, alora)

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf or (self.head_lr is not None and not 0 < self.head_lr < math.inf):
            raise ValueError(f"learning rates must be finite and > 0, got lr={self.lr}, head_lr={self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    median_step_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def param_groups(model: nn.Module, config: TrainConfig, head: list[nn.Parameter] | None = None) -> list[dict]:
    """Adapter parameters at `lr`, the head at `head_lr`: the given `head` parameters, by default the full-trained
    extras outside svdtune's adapters (train_also)."""
    extra = {id(p) for p in (extra_trainable(model).values() if head is None else head)}
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in extra]
    head = [p for p in model.parameters() if p.requires_grad and id(p) in extra]
    groups = [{"params": own, "lr": config.lr}]
    if head:
        groups.append({"params": head, "lr": config.head_lr or config.lr})
    return [g for g in groups if g["params"]]


def has_accelerator() -> bool:
    """Whether a GPU-like device is present. Without one, Accelerate must be told `cpu=True`, or a torchrun launch
    on CPUs silently trains each process on its own (no gradient all-reduce)."""
    probe = getattr(torch, "accelerator", None)
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for `config`; on a machine without a GPU, a clear error for fp16 instead of a silent no-op."""
    cpu = not has_accelerator()
    if cpu and config.mixed_precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU and none is available; on a CPU use bf16 (--bf16), which "
                         "CPUs autocast, or full precision")
    if cpu and config.mixed_precision == "bf16":
        # autocast converts below the Python level, where `upcast.Float32Products` cannot reach
        slow_bf16_warning("cpu", "bf16 autocast")
    options = dict(gradient_accumulation_steps=config.grad_accum, cpu=cpu, mixed_precision=config.mixed_precision)
    try:
        return Accelerator(**options)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
    # Accelerate keeps one precision per process; a second run in the same process with another precision resets
    # that setting (not the distributed state, which stays as the launcher set it).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**options)


def own_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss the model computes itself from a batch with labels."""
    return model(**batch).loss


def train(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], config: TrainConfig, *,
          metrics_path: Path | None = None, checkpoint_dir: Path | None = None, progress: bool = True,
          description: str = "train", held_out: dict[str, torch.Tensor] | None = None,
          loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
          on_step: Callable[[int], None] | None = None, head: list[nn.Parameter] | None = None) -> TrainResult:
    """Train the trainable parameters of `model` on `batches` (dicts the model accepts, with labels) in place.

    With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every` steps and at the end, and a run
    that finds one there resumes from it exactly: give it the model adapted the same way and the same seeded batch
    stream from its start (it is fast-forwarded to the saved position).
    Adaptive-rank adapters get a `RankAllocator` (config.allocation) called after every optimizer step; its masks and
    importance EMAs are part of the checkpoint. ALoRA scores its ranks on `held_out`, a batch kept out of training.
    `loss_fn(model, batch)` replaces the model's own `.loss` (e.g. `data.causal_lm.answer_loss`, the same loss with the LM
    head at the labelled positions only) in a single-process run; under a launcher the model's own forward is kept,
    since DDP synchronises gradients through it. `on_step(step)` runs after every optimizer step, before the
    gradients are cleared (PEFT's AdaLoRA allocates its ranks there). `head`: the parameters trained at
    `config.head_lr` (default: those outside svdtune's adapters, see `param_groups`).
    """
    groups = param_groups(model, config, head)
    if not groups:
        raise ValueError("the model has no trainable parameters: call svdtune.adapt(model, ...) first")
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * config.steps), config.steps)
    allocator = build_allocator(model, config.steps, config.allocation, held_out=held_out)
    record = run_record(config, model)
    done = resumed(checkpoint_dir, model, optimizer, scheduler, allocator, record, batches)
    accelerator = make_accelerator(config)
    # The scheduler stays ours: Accelerate's wrapper steps it once per process per step (it assumes the data loader
    # shrinks with the number of processes), which would run the schedule world_size times too fast here.
    model, optimizer = accelerator.prepare(model, optimizer)
    found = list(adapters(model).values())
    main = accelerator.is_main_process  # under torchrun/accelerate launch, only rank 0 logs and checkpoints
    if loss_fn is None or accelerator.num_processes > 1:
        loss_fn = own_loss
    bar = tqdm(range(done.step, config.steps), desc=description, unit="step", disable=not (progress and main),
               initial=done.step, total=config.steps)
    step_seconds: list[float] = []
    tokens_before = done.tokens
    model.train()
    start = time.perf_counter()
    with PeakMemory(accelerator.device) as memory, contextlib.ExitStack() as stack:
        log = stack.enter_context(metrics_path.open("a")) if metrics_path is not None and main else None
        stack.enter_context(bf16_products(model))  # a bf16 model on a CPU without bf16 units: float32 products
        for step in bar:
            step_start = time.perf_counter()
            for _ in range(config.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                done.batches += 1
                done.tokens += real_tokens(batch)
                with accelerator.accumulate(model):
                    loss = backward_pass(model, batch, loss_fn, found, accelerator, config, step, checkpoint_dir)
                    update(model, optimizer, scheduler, accelerator, config, step, allocator, on_step)
            done.step = step + 1
            step_seconds.append(time.perf_counter() - step_start)
            done.losses.append(loss.item())
            bar.set_postfix(loss=f"{done.losses[-1]:.4f}", tok_s=f"{done.tokens / (time.perf_counter() - start):.0f}")
            if log is not None and (done.step % config.log_every == 0 or done.step == config.steps):
                log_metrics(log, done, scheduler.get_last_lr()[0], time.perf_counter() - start)
            if main and checkpoint_dir is not None and (done.step % config.checkpoint_every == 0
                                                        or done.step == config.steps):
                checkpoint(accelerator.unwrap_model(model), optimizer, scheduler, done, allocator, record, config,
                           checkpoint_dir)
    seconds = time.perf_counter() - start
    return TrainResult(steps=config.steps, final_loss=done.losses[-1] if done.losses else math.nan,
                       median_step_seconds=statistics.median(step_seconds) if step_seconds else 0.0,
                       tokens_per_second=(done.tokens - tokens_before) / max(seconds, 1e-9),
                       peak_memory_mb=memory.peak_mb, seconds=seconds, losses=done.losses)


def resumed(checkpoint_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            allocator: Any, record: dict[str, Any], batches: Iterator[dict[str, torch.Tensor]]) -> Progress:
    """Where the run starts: fresh, or from the checkpoint in `checkpoint_dir` (model, optimizer, scheduler and rank
    allocator restored, the run record checked: a changed run is refused, the seeded batch stream fast-forwarded)."""
    if checkpoint_dir is None or not (checkpoint_dir / CHECKPOINT_FILE).exists():
        return Progress()
    done = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, run=record)
    if allocator is not None:
        allocator.load_state_dict(read_extra(checkpoint_dir))
    for _ in range(done.batches):  # the same seeded stream, back at the saved position
        next(batches)
    return done


def log_metrics(log: IO[str], done: Progress, lr: float, seconds: float) -> None:
    """One line of the metrics JSONL, flushed: a crashed run keeps every line written before it."""
    log.write(json.dumps({"step": done.step, "loss": done.losses[-1], "lr": lr, "tokens": done.tokens,
                          "seconds": seconds}) + "\n")
    log.flush()


def backward_pass(model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: Callable, found: list,
                  accelerator: Accelerator, config: TrainConfig, step: int,
                  checkpoint_dir: Path | None) -> torch.Tensor:
    """Loss of one micro-batch plus the adapters' regularisers, refused when not finite, then its backward pass."""
    loss = loss_fn(model, batch)
    penalty = regularisation(found)
    if penalty is not None:
        loss = loss + penalty
    if not math.isfinite(loss.item()):
        raise diverged(f"step {step + 1}: the loss is {loss.item()}; training stopped before the update", config,
                       checkpoint_dir)
    accelerator.backward(loss)
    return loss


def update(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, accelerator: Accelerator,
           config: TrainConfig, step: int, allocator: Any, on_step: Callable[[int], None] | None) -> None:
    """Clip, step the optimizer (Accelerate skips it between accumulated micro-batches), run the rank allocator and
    `on_step` after a real update and before the gradients are cleared, and advance the schedule."""
    if accelerator.sync_gradients and config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    if accelerator.sync_gradients:
        if allocator is not None:  # after the update, before zero_grad: it reads the gradients
            allocator.step(model, step + 1, optimizer=optimizer)
        if on_step is not None:
            on_step(step + 1)
        scheduler.step()
    optimizer.zero_grad()


def checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, done: Progress, allocator: Any,
               record: dict, config: TrainConfig, checkpoint_dir: Path) -> None:
    """Save a checkpoint, never one whose parameters went NaN/Inf."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise diverged(f"step {done.step}: the parameters hold NaN/Inf; training stopped", config, checkpoint_dir)
    save_checkpoint(checkpoint_dir, model, optimizer, scheduler, done,
                    extra=allocator.state_dict() if allocator is not None else None, run=record)


def run_record(config: TrainConfig, model: nn.Module) -> dict:
    """What a resumed run must share with its checkpoint: the model's adapter method and options, and `config`
    (how often to log or checkpoint may change; everything that shapes the updates may not)."""
    record = dataclasses.asdict(config)
    for free in ("log_every", "checkpoint_every"):
        record.pop(free)
    found = adapters(model)
    configs = [(a.name, dataclasses.asdict(a.config)) for a in found.values()]
    record["method"] = sorted({name for name, _ in configs})
    record["method_options"] = configs[0][1] if configs and all(c == configs[0] for c in configs) else None
    return record


def diverged(what: str, config: TrainConfig, checkpoint_dir: Path | None) -> TrainingDiverged:
    """The error for a run that went NaN/Inf: nothing non-finite is saved, and a checkpoint there is the last good
    state."""
    kept = ""
    if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_FILE).exists():
        kept = f"; {checkpoint_dir / CHECKPOINT_FILE} holds the last good state"
    return TrainingDiverged(f"{what}, and nothing non-finite was saved{kept}. Start over with a lower learning "
                            f"rate (lr={config.lr}) or check the data")


def plot_losses(metrics_path: Path, stem: Path) -> None:
    """Loss curve from a metrics JSONL, as PNG and SVG next to the adapter."""
    from ..plotting import save_figure, subplots

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    save_figure(fig, stem)


def plot_rank_allocation(model: nn.Module, stem: Path) -> Path | None:
    """For adaptive-rank adapters, the final rank per layer and module type as a PNG heat map next to the loss
    curve; None for other methods."""
    final = ranks(model)
    return plot_ranks(final, stem) if final else None
