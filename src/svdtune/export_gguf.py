"""GGUF files for llama.cpp (and what runs on it: Ollama, LM Studio, llama-cpp-python): LoRA adapters, merged models.

llama.cpp loads a LoRA adapter only as a GGUF file: `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`, and per adapted weight `<gguf name>.weight.lora_a` (r x in) and `.lora_b` (out x r), named after
the base GGUF file's own tensors (`blk.3.attn_q`, `blk.3.ffn_down`, ...). It scales every tensor pair by
alpha / (that pair's rank), ignores rsLoRA and per-module alphas, and refuses any tensor that is not a LoRA factor.
So `export_gguf` writes what that rule reads right:

* the exact low-rank factors of every update (`export.factors_to_export`: LoRA and LoRA-XS at rank r, the residual
  methods at 2r, adaptive ranks as they survived), or the best rank-k truncation of full-rank updates (SVF, SVFT)
  with its relative error reported, as the PEFT export does;
* each module's scale folded into its B and every pair zero-padded to one rank R with alpha = R, so llama.cpp's
  alpha / R is 1 for every tensor whatever the method's own scale and ranks;
* the tensor layout of the base GGUF: llama.cpp's converter stores a llama model's q and k projections with their
  rows permuted (rotary halves interleaved per head), so lora_b of those two is permuted the same way (ΔW's rows are
  B's rows); every name and shape is checked against the base file before anything is written.

`export_merged_gguf` writes the other thing llama.cpp users run: the whole model with every update folded in
(W + ΔW, exact for every method), so no adapter is needed at serving time. It copies the base GGUF file, metadata and
all, and replaces the adapted weights (dequantised, plus ΔW in the file's layout) by F16 or F32 tensors.

The architectures whose linear layers the converter stores unmodified, apart from that permutation, are supported
(`ARCHITECTURES`); others are refused rather than exported wrongly. The file is written to a temporary sibling and
moved into place, so a killed export never leaves a torn adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from .core import LowRank
from .export import checked_adapters, factors_to_export, padded, plain_adapters
from .paths import check_creatable, write_atomic

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
MERGED_TYPES = {"f16": (gguf.GGMLQuantizationType.F16, np.float16), "f32": (gguf.GGMLQuantizationType.F32, np.float32)}
PERMUTED = {"llama": ("attn_q", "attn_k")}  # tensors llama.cpp's converter stores with rotary-permuted rows


class GGUFExportError(ValueError):
    """The base GGUF file does not match the adapted model, or its architecture is not supported."""


def rotary_permuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q or k projection (or its LoRA B) in llama.cpp's GGUF order: within each of `heads` heads, the
    two rotary halves interleaved (the permutation `convert_hf_to_gguf.py` applies to llama models)."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def read_base(base: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(base)
    except (OSError, ValueError) as e:
        raise GGUFExportError(f"{base} is not a readable GGUF model file ({e})") from None


def base_layout(reader: gguf.GGUFReader, base: Path) -> tuple[str, dict[str, tuple[int, ...]], dict[str, int]]:
    """(architecture, {tensor name: numpy-order shape}, {"heads", "kv_heads", "blocks"}) of the GGUF model file
    `base`, read by `reader`."""

    def field(key: str) -> object:
        value = reader.fields.get(key)
        if value is None:
            raise GGUFExportError(f"{base} lacks the GGUF field {key!r}; is it a model (not an adapter) file?")
        return value.contents()

    arch = str(field("general.architecture"))
    if arch not in ARCHITECTURES:
        raise GGUFExportError(f"{base} is a {arch!r} model; GGUF adapters are written for {', '.join(ARCHITECTURES)} "
                              "(use `svdtune export-lora` and convert with llama.cpp's convert_lora_to_gguf.py)")
    sizes = {"heads": int(field(f"{arch}.attention.head_count")), "blocks": int(field(f"{arch}.block_count"))}
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    sizes["kv_heads"] = int(kv.contents()) if kv is not None else sizes["heads"]
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return arch, shapes, sizes


def gguf_weight(name: str, arch: str, names: gguf.TensorNameMap) -> str:
    """The base GGUF file's tensor name for the weight of module `name` (e.g. ``blk.3.attn_q.weight``)."""
    mapped = names.get_name(name)
    if mapped is None:
        raise GGUFExportError(f"{name} has no counterpart in a {arch} GGUF model; export only the layers llama.cpp "
                              "knows (the attention and MLP projections)")
    return f"{mapped}.weight"


def in_gguf_layout(rows: torch.Tensor, weight: str, arch: str, sizes: dict[str, int]) -> torch.Tensor:
    """`rows` (indexed like the weight's output rows: B, ΔW or W) in the base file's layout for tensor `weight`."""
    kind = weight.split(".")[-2]
    if kind in PERMUTED.get(arch, ()):
        return rotary_permuted(rows, sizes["heads"] if kind == "attn_q" else sizes["kv_heads"])
    return rows


def gguf_factors(name: str, factors: LowRank, arch: str, sizes: dict[str, int],
                 names: gguf.TensorNameMap) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(base tensor name, lora_a, lora_b) of one module in the base file's naming and layout."""
    weight = gguf_weight(name, arch, names)
    return weight, factors.A, in_gguf_layout(factors.B, weight, arch, sizes)


def check_output_file(path: Path, *, overwrite: bool, base: Path | None = None) -> None:
    """Refuse an output that is a directory, an existing file without `overwrite`, or the base model file itself."""
    if path.is_dir():
        raise FileExistsError(f"{path} is a directory; a GGUF adapter is one file: choose a path ending in .gguf")
    check_creatable(path.parent)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; a GGUF adapter file is replaced only with overwrite=True "
                              "(--overwrite), or choose another path")
    if base is not None and path.resolve() == base.resolve():
        raise FileExistsError(f"{path} is the base model file itself; choose another path")


def export_gguf(model: nn.Module, path: str | os.PathLike, *, base: str | os.PathLike, rank: int | None = None,
                energy: float | None = None, overwrite: bool = False) -> dict[str, float]:
    """Write the model's adapters as a llama.cpp GGUF LoRA adapter for the GGUF model file `base` (the file the
    model was loaded from); returns the relative error per module (0.0 where exact; see the module docstring).
    `rank`/`energy` truncate every update as in `export_lora`; full-rank methods need one of them."""
    path, base = Path(path), Path(base)
    found = checked_adapters(model, rank, energy, "serving")
    check_output_file(path, overwrite=overwrite, base=base)
    arch, shapes, sizes = base_layout(read_base(base), base)
    exported, errors = factors_to_export(found, rank, energy)
    top = max(f.rank for f in exported.values())
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], sizes["blocks"])
    tensors = {}
    for name, factors in exported.items():
        weight, A, B = gguf_factors(name, padded(factors, top), arch, sizes, names)
        check_shape(name, (B.shape[0], A.shape[1]), weight, shapes, base)
        tensors[f"{weight}.lora_a"] = A.float().cpu().numpy()
        tensors[f"{weight}.lora_b"] = B.float().cpu().numpy()

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(top))  # alpha / R = 1: scales are folded into B
        writer.add_string("general.name", f"svdtune {next(iter(found.values())).name} adapter")
        for key, value in tensors.items():
            writer.add_tensor(key, np.ascontiguousarray(value))
        finish(writer)

    write_atomic(path, write)
    return errors


def export_merged_gguf(model: nn.Module, path: str | os.PathLike, *, base: str | os.PathLike, dtype: str = "f16",
                       overwrite: bool = False) -> int:
    """Write the base GGUF model file with every adapted weight replaced by W + ΔW (exact for every method, SVF and
    SVFT included): a complete model that llama.cpp and Ollama run with no adapter. W is the base file's own tensor,
    dequantised; the merged tensors are stored in `dtype` ("f16" or "f32"), every other tensor and all metadata
    (tokenizer, hyper-parameters) are copied unchanged. Returns the number of tensors replaced."""
    path, base = Path(path), Path(base)
    if dtype not in MERGED_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(MERGED_TYPES)}, got {dtype!r}")
    found = plain_adapters(model, "a GGUF language model", "merge it as a Hugging Face model instead (svdtune merge)")
    check_output_file(path, overwrite=overwrite, base=base)
    reader = read_base(base)
    arch, shapes, sizes = base_layout(reader, base)
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], sizes["blocks"])
    stored = {t.name: t for t in reader.tensors}
    kind, np_dtype = MERGED_TYPES[dtype]
    merged = {}
    for name, adapter in found.items():
        weight = gguf_weight(name, arch, names)
        check_shape(name, adapter.shape, weight, shapes, base)
        t = stored[weight]
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shapes[weight])
        delta = in_gguf_layout(adapter.delta().detach().double().cpu(), weight, arch, sizes)
        merged[weight] = (torch.from_numpy(W.astype(np.float64)) + delta).numpy().astype(np_dtype)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue  # written by the writer / no longer one type: llama.cpp infers it from the tensors
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        for t in reader.tensors:
            if t.name in merged:
                writer.add_tensor(t.name, merged[t.name], raw_dtype=kind)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        finish(writer)

    write_atomic(path, write)
    return len(merged)


def check_shape(name: str, shape: tuple[int, int], weight: str, shapes: dict[str, tuple[int, ...]],
                base: Path) -> None:
    """Refuse a module whose weight is missing from the base file or has another shape there."""
    if shapes.get(weight) != tuple(shape):
        raise GGUFExportError(f"{name} is {shape[0]}x{shape[1]} here but {weight} is "
                              f"{'missing' if weight not in shapes else 'x'.join(map(str, shapes[weight]))} in "
                              f"{base}: the adapter was not trained on this model")


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
