"""The method registry: an explicit dict, so adding a method is one file and one entry, with no import side effects."""

from __future__ import annotations

from ..core import Adapter
from .adalora import AdaLoRA, LoRA2
from .alora import ALoRA
from .lora import LoRA, MiLoRA, OLoRA, PiSSA
from .lora_xs import LoRAXS
from .svf import SVF
from .svft import SVFT

METHODS: dict[str, type[Adapter]] = {cls.name: cls for cls in (LoRA, PiSSA, MiLoRA, OLoRA, LoRAXS, SVF, SVFT,
                                                                   AdaLoRA, LoRA2, ALoRA)}


def get_method(name: str) -> type[Adapter]:
    """The adapter class registered under `name`; the error lists every known method."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def rank_option(name: str, r: int) -> dict[str, int]:
    """{"r": r} for a method that has a rank, {} for one that has none (SVF): lets one loop drive every method."""
    return {"r": r} if "r" in get_method(name).Config.__dataclass_fields__ else {}
