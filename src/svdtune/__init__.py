"""svdtune: parameter-efficient fine-tuning beyond LoRA, with SVD-based adapters for Hugging Face models.

    import svdtune
    svdtune.adapt(model, "pissa", r=8)      # wrap the default target layers, freeze the rest
    ...train...
    svdtune.save_adapter(model, "out/")     # safetensors + JSON, with the base model's fingerprint
    svdtune.merge(model)                    # plain nn.Linear layers again, zero inference overhead
"""

__version__ = "0.1.0"

from .allocator import keep_freed_memory  # noqa: E402
from .core import Adapter, LowRank  # noqa: E402
from .export import export_lora, load_peft_lora  # noqa: E402
from .inject import AdaptSummary, adapt, adapters, disabled, merge, unload  # noqa: E402
from .io import AdapterFileError, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from .methods import METHODS, get_method  # noqa: E402
from .upcast import bf16_products  # noqa: E402

__all__ = [
    "METHODS", "AdaptSummary", "Adapter", "AdapterFileError", "LowRank", "adapt", "adapters", "bf16_products",
    "disabled", "export_lora", "get_method", "keep_freed_memory", "load_adapter", "load_peft_lora", "merge",
    "read_adapter_config", "save_adapter", "unload", "__version__",
]
