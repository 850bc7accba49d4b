"""Reference runs for the benchmark: full fine-tuning, and PEFT's own LoRA, PiSSA and AdaLoRA on the same targets.

A peer implementation in the same table, trained by the same loop on the same data, steps, seeds and evaluation, is
how a reader checks svdtune's rows: PEFT's LoRA should tie svdtune's LoRA. Full fine-tuning (every parameter,
float32 weights and AdamW state whatever the suite's precision, since 16-bit master weights would lose small
updates) is the ceiling a parameter-efficient method is measured against.

`prepare` turns a freshly loaded model into the reference's trainable model and says how the loop must drive it:
PEFT's AdaLoRA allocates its ranks in `update_and_allocate(step)` after every optimizer step and adds its
orthogonality penalty inside the model's own forward (so it keeps the model's loss).
"""

from __future__ import annotations

import importlib.util
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..allocate import AllocationConfig
from ..errors import UserError

FULL = "full"
PEFT_LORA, PEFT_PISSA, PEFT_ADALORA = "peft-lora", "peft-pissa", "peft-adalora"
PEFT_REFERENCES = (PEFT_LORA, PEFT_PISSA, PEFT_ADALORA)  # PEFT's own adapters: they need PEFT installed
REFERENCES = (FULL, *PEFT_REFERENCES)
# The svdtune method whose default learning rate a reference starts its grid from.
RATE_OF = {PEFT_LORA: "lora", PEFT_PISSA: "pissa", PEFT_ADALORA: "adalora"}


class PeftMissing(UserError, ModuleNotFoundError):
    """A PEFT reference row was asked for and PEFT is not installed (the command line prints it as one line)."""


def check_installed(names: list[str]) -> None:
    """Fail before anything trains when a reference among `names` needs PEFT and PEFT is not installed: a suite
    would otherwise stop at that reference's first run, after every configuration before it."""
    needing = [name for name in names if name in PEFT_REFERENCES]
    if needing and importlib.util.find_spec("peft") is None:
        raise PeftMissing(f"the reference runs {', '.join(needing)} are PEFT's own adapters, and PEFT is not "
                          "installed: pip install 'svdtune[bench]' (or pip install peft), or choose the "
                          "configurations without them with --methods")


@dataclass
class Prepared:
    model: nn.Module
    trainable: int
    init_seconds: float
    own_loss: bool  # train on the model's own forward loss (it adds terms of its own)
    on_step: Callable[[int], None] | None = None
    head: list[nn.Parameter] = field(default_factory=list)  # the task head, trained in full (not counted)


def prepare(model: nn.Module, name: str, *, r: int, targets: str, steps: int,
            allocation: AllocationConfig = AllocationConfig(), head: str | None = None) -> Prepared:
    """The reference `name` (one of REFERENCES) on `model`: rank `r` on the layers `targets` (a PEFT full-match
    regex, `module_names`) for PEFT's; `head`, a module name (a classifier's "classifier"), trains in full beside
    PEFT's adapters (its `modules_to_save`) and is not counted, as svdtune's `train_also`."""
    start = time.perf_counter()
    if name == FULL:
        model = model.float().requires_grad_(True)
        head_params = list(model.get_submodule(head).parameters()) if head else []
        trainable = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in head_params)
        return Prepared(model, trainable, 0.0, own_loss=False, head=head_params)
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; the references are {', '.join(REFERENCES)}")
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if name == PEFT_ADALORA:
        t_init = allocation.t_init if allocation.t_init is not None else steps // 10
        t_final = allocation.t_final if allocation.t_final is not None else steps // 5
        target_r = round(allocation.target_rank) if allocation.target_rank is not None else max(1, round(2 * r / 3))
        config = AdaLoraConfig(init_r=r, target_r=target_r, lora_alpha=r, target_modules=targets, tinit=t_init,
                               tfinal=t_final, deltaT=allocation.interval, beta1=allocation.beta1,
                               beta2=allocation.beta2, total_step=steps, orth_reg_weight=0.1, lora_dropout=0.0,
                               modules_to_save=[head] if head else None)
    else:
        config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0,
                            init_lora_weights="pissa" if name == PEFT_PISSA else True,
                            modules_to_save=[head] if head else None)
    with warnings.catch_warnings():  # PEFT asks transformers' deprecated alias; nothing a user can act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    head_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad) - sum(p.numel() for p in head_params)
    seconds = time.perf_counter() - start
    allocate = peft_model.base_model.update_and_allocate if name == PEFT_ADALORA else None
    return Prepared(peft_model, trainable, seconds, own_loss=name == PEFT_ADALORA, on_step=allocate, head=head_params)


def module_names(layers: dict[str, nn.Module]) -> str:
    """PEFT's `target_modules` for exactly the given layers: a regex PEFT full-matches against module names (a list
    of short names like "dense" would also catch layers svdtune does not adapt, e.g. BERT's pooler)."""
    return "|".join(re.escape(name) for name in layers)


def is_reference(method: str) -> bool:
    return method in REFERENCES
