"""SVF experts: offset arithmetic against hand-computed vectors, refusals, in-place swapping, CEM on problems with a
known optimum, and two-pass dispatch where the right expert is forced."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdtune
from svdtune.experts import arithmetic as ex
from svdtune.experts.dispatch import (
    CEMConfig,
    Example,
    ExpertMixer,
    TwoPass,
    cem,
    continuation_logprobs,
    few_shot_fitness,
)

from helpers import VOCAB, make_model, output, tokens


class CharTokenizer:
    """One token per character (id = code point mod VOCAB), BOS = 1: enough of a tokenizer for dispatch."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def save_svf_expert(path, seed: int, **options) -> ex.Expert:
    """An SVF adapter on the shared tiny base with random vectors (seeded), saved and read back as an expert."""
    model = svdtune.adapt(make_model(), "svf", verbose=False, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    svdtune.save_adapter(model, path)
    return ex.load_expert(path)


@pytest.fixture
def pair(tmp_path):
    return save_svf_expert(tmp_path / "a", 1), save_svf_expert(tmp_path / "b", 2)


def test_sum_of_experts_is_the_adapter_with_summed_offsets(pair, tmp_path) -> None:
    a, b = pair
    c = ex.save_expert(ex.add(a, b), tmp_path / "c")
    model = svdtune.load_adapter(make_model(), c)
    manual = svdtune.load_adapter(make_model(), tmp_path / "a")
    with torch.no_grad():
        for name, adapter in svdtune.adapters(manual).items():
            adapter.z.copy_(1 + (a.vectors[name] - 1) + (b.vectors[name] - 1))
    for name, adapter in svdtune.adapters(model).items():
        torch.testing.assert_close(adapter.z, a.vectors[name] + b.vectors[name] - 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(output(model, tokens()), output(manual, tokens()), rtol=0, atol=1e-5)
    d = ex.subtract(ex.add(a, b), b)
    assert all(torch.allclose(d.vectors[n], a.vectors[n], atol=1e-6) for n in a.vectors)


def test_interpolation_at_zero_and_one_returns_each_expert(pair) -> None:
    a, b = pair
    for t, expected in ((0.0, a), (1.0, b)):
        mixed = ex.interpolate(a, b, t)
        assert all(torch.allclose(mixed.vectors[n], expected.vectors[n], rtol=0, atol=1e-7) for n in a.vectors)
    half = ex.interpolate(a, b, 0.5)
    assert all(torch.allclose(half.vectors[n], (a.vectors[n] + b.vectors[n]) / 2, atol=1e-7) for n in a.vectors)


def test_per_layer_weights(pair) -> None:
    a, b = pair
    modules = list(a.vectors)
    first, rest = modules[0], set(modules[1:])
    mixed = ex.combine([a, b], [{m: float(m == first) for m in modules}, {m: float(m in rest) for m in modules}])
    assert torch.allclose(mixed.vectors[first], a.vectors[first], atol=1e-7)
    assert all(torch.allclose(mixed.vectors[m], b.vectors[m], atol=1e-7) for m in rest)
    with pytest.raises(ValueError, match="must name every adapted module exactly"):
        ex.combine([a, b], [{first: 1.0}, 0.5])


def test_sigmoid_experts_mix_their_z_as_the_paper_and_store_the_theta_of_the_mix(tmp_path) -> None:
    a = save_svf_expert(tmp_path / "a", 1, parametrization="sigmoid")
    b = save_svf_expert(tmp_path / "b", 2, parametrization="sigmoid")
    mixed = ex.combine([a, b], [0.7, 0.3])
    assert mixed.key == "theta"
    for n in a.vectors:
        z = 0.7 * torch.sigmoid(a.vectors[n].double()) + 0.3 * torch.sigmoid(b.vectors[n].double())
        torch.testing.assert_close(torch.sigmoid(mixed.vectors[n].double()), z, rtol=1e-6, atol=0)
        assert not torch.allclose(mixed.vectors[n], 0.7 * a.vectors[n] + 0.3 * b.vectors[n], atol=1e-4)  # not θ
    model = svdtune.load_adapter(make_model(), ex.save_expert(mixed, tmp_path / "c"))
    assert all(torch.equal(ad.theta, mixed.vectors[n]) for n, ad in svdtune.adapters(model).items())
    assert all(torch.equal(v, a.vectors[n]) for n, v in ex.combine([a, b], [1.0, 0.0]).vectors.items())


def test_sigmoid_mix_beyond_one_keeps_the_weight_and_a_negative_one_is_refused(tmp_path) -> None:
    a = save_svf_expert(tmp_path / "a", 1, parametrization="sigmoid")
    b = save_svf_expert(tmp_path / "b", 2, parametrization="sigmoid")
    ids = tokens()
    halves = svdtune.load_adapter(make_model(), ex.save_expert(ex.combine([a, b], [0.5, 0.5]), tmp_path / "h"))
    doubled = svdtune.load_adapter(make_model(), ex.save_expert(ex.combine([a, b], [1.0, 1.0]), tmp_path / "d"))
    torch.testing.assert_close(output(doubled, ids), output(halves, ids), rtol=1e-5, atol=1e-5)  # 2 z: the same W'
    zero = svdtune.load_adapter(make_model(), ex.save_expert(ex.combine([a, b], [0.0, 0.0]), tmp_path / "z"))
    torch.testing.assert_close(output(zero, ids), output(make_model(), ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="leaves z <= 0"):
        ex.subtract(a, b)


def test_sigmoid_svf_implies_the_rescale_and_refuses_it_off() -> None:
    from svdtune.methods.svf import SVFConfig

    assert SVFConfig(parametrization="sigmoid").rescale is True and SVFConfig().rescale is False
    with pytest.raises(ValueError, match="needs rescale=True"):
        SVFConfig(parametrization="sigmoid", rescale=False)
    model = svdtune.adapt(make_model(), "svf", parametrization="sigmoid", verbose=False)
    with torch.no_grad():
        adapted, base = output(model, tokens()), output(make_model(), tokens())
    assert float((adapted - base).abs().max()) < 0.05 * float(base.abs().max())  # z ≈ 0.525: W' ≈ W, not W / 2


def test_experts_of_other_bases_configs_or_methods_are_refused(pair, tmp_path) -> None:
    a, _ = pair
    other_base = make_model(seed=7)
    svdtune.adapt(other_base, "svf", verbose=False)
    svdtune.save_adapter(other_base, tmp_path / "other")
    with pytest.raises(ValueError, match="trained on different base weights"):
        ex.add(a, ex.load_expert(tmp_path / "other"))
    with pytest.raises(ValueError, match="different SVF configs"):
        ex.add(a, save_svf_expert(tmp_path / "sig", 3, parametrization="sigmoid"))
    with pytest.raises(ValueError, match="adapt different modules"):
        ex.add(a, save_svf_expert(tmp_path / "mlp", 3, targets="mlp-only"))
    svdtune.save_adapter(svdtune.adapt(make_model(), "lora", r=2, verbose=False), tmp_path / "lora")
    with pytest.raises(ValueError, match="is a lora adapter; experts are SVF adapters"):
        ex.load_expert(tmp_path / "lora")
    with pytest.raises(ValueError, match="2 weights for 1 experts"):
        ex.combine([a], [1.0, 2.0])


def test_save_expert_never_overwrites_without_being_asked(pair, tmp_path) -> None:
    a, b = pair
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        ex.save_expert(ex.add(a, b), tmp_path / "a")
    ex.save_expert(ex.add(a, b), tmp_path / "a", overwrite=True)
    assert ex.load_expert(tmp_path / "a").meta["combined_from"] == "a+b"


def test_swapping_experts_in_place_equals_loading_them(pair, tmp_path) -> None:
    a, b = pair
    model = svdtune.load_adapter(make_model(), tmp_path / "a")
    mixer = ExpertMixer(model, [a, b])
    mixer.use("b")
    assert torch.equal(output(model, tokens()), output(svdtune.load_adapter(make_model(), tmp_path / "b"), tokens()))
    mixer.use(None)
    assert torch.equal(output(model, tokens()), output(make_model(), tokens()))
    mixer.mix(torch.tensor([0.25, 0.75]))
    expected = svdtune.load_adapter(make_model(), ex.save_expert(ex.interpolate(a, b, 0.75), tmp_path / "m"))
    torch.testing.assert_close(output(model, tokens()), output(expected, tokens()), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"alpha must have shape \(2,\) or \(2, 14\)"):
        mixer.mix(torch.ones(3))
    fresh = svdtune.adapt(make_model(seed=7), "svf", verbose=False)
    with pytest.raises(ValueError, match="trained on other base weights"):
        ExpertMixer(fresh, [a, b])


@pytest.mark.parametrize("shape", [(3,), (2, 4)])
def test_cem_finds_the_known_best_mixture(shape) -> None:
    target = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = cem(lambda alpha: -float((alpha - target).pow(2).sum()), torch.full(shape, 0.5),
                 CEMConfig(population=32, elite_ratio=0.2, iterations=40, seed=1))
    assert (result.best - target).abs().max() < 1e-2  # CEM without a noise floor stops within ~1e-3..1e-2
    assert result.history == sorted(result.history)
    clipped = cem(lambda alpha: float(alpha.sum()), torch.zeros(shape), CEMConfig(iterations=10))
    assert clipped.best.min() >= 0.0 and clipped.best.max() <= 1.0  # the box [0, 1] bounds an unbounded objective


def test_few_shot_mixing_keeps_the_best_mixture_it_evaluated(pair, tmp_path) -> None:
    a, b = pair
    tokenizer = CharTokenizer()
    model = svdtune.load_adapter(make_model(), tmp_path / "a")
    two_pass = TwoPass(model, tokenizer, [a, b])
    choices = ("w", "x", "y")
    examples = [Example("ab", "w", choices), Example("cd", "y", choices), Example("ef", "x")]
    seen = []
    fitness = few_shot_fitness

    def recording(*args):
        seen.append(fitness(*args))
        return seen[-1]

    import svdtune.experts.dispatch as dispatch
    dispatch.few_shot_fitness, restore = recording, dispatch.few_shot_fitness
    try:
        result = two_pass.fit_mixture(examples, CEMConfig(population=4, iterations=2, seed=0), per_layer=True)
    finally:
        dispatch.few_shot_fitness = restore
    assert len(seen) == 8 and result.fitness == max(seen) and result.best.shape == (2, 14)
    assert few_shot_fitness(model, tokenizer, examples) == result.fitness  # the model now runs with the best α
    assert two_pass.prepare("anything") is None  # and keeps it for later queries


def test_dispatch_picks_the_forced_expert_and_runs_the_second_pass_with_it(pair, tmp_path) -> None:
    a, b = pair
    tokenizer = CharTokenizer()
    model = svdtune.load_adapter(make_model(), tmp_path / "a")
    forced = nn.Linear(32, VOCAB, bias=True)  # the first pass can only prefer the characters of "b"
    with torch.no_grad():
        forced.weight.zero_()
        forced.bias.fill_(-10.0)
        forced.bias[tokenizer.encode("b", add_special_tokens=False)[0]] = 10.0
        forced.bias[tokenizer.encode(" ", add_special_tokens=False)[0]] = 10.0
    real_head, model.lm_head = model.lm_head, forced
    two_pass = TwoPass(model, tokenizer, {"a": a, "b": b})
    assert two_pass.choose("what is 2 + 2?") == "b"
    two_pass.score("what is 2 + 2?", [" 4", " 5"])
    assert all(torch.equal(ad.z, b.vectors[n]) and ad.enabled for n, ad in svdtune.adapters(model).items())
    model.lm_head = real_head
    picks = TwoPass(model, tokenizer, [a, b], classifier=lambda q: None if "hi" in q else "a")
    text = picks.generate("hi there", max_new_tokens=3, do_sample=False)
    assert 1 <= len(text) <= 3 and not any(ad.enabled for ad in svdtune.adapters(model).values())
    scores = picks.score("2 + 2", [" 4", " 5"])
    assert all(torch.equal(ad.z, a.vectors[n]) and ad.enabled for n, ad in svdtune.adapters(model).items())
    assert scores == continuation_logprobs(svdtune.load_adapter(make_model(), tmp_path / "a"), tokenizer, "2 + 2",
                                           [" 4", " 5"])


def test_cli_combines_experts_and_never_overwrites_without_force(pair, tmp_path, capsys) -> None:
    from svdtune.cli.commands import main

    a, b = pair
    args = ["experts", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7", "0.3",
            "--out", str(tmp_path / "c")]
    assert main(args) == 0
    combined = ex.load_expert(tmp_path / "c")
    expected = ex.combine([a, b], [0.7, 0.3])
    assert all(torch.equal(combined.vectors[n], expected.vectors[n]) for n in a.vectors)
    assert main(args) == 2 and "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([*args[:-5], "--weights", "1", "--out", str(tmp_path / "d")]) == 2
    assert "1 weights for 2 experts" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_arithmetic_keeps_every_tensor_of_the_file(pair, tmp_path) -> None:
    """Experts are read and written through svdtune.io: a tensor the format gains (here a per-module `note`) travels
    through combine and save unchanged instead of being dropped."""
    from svdtune.io import AdapterFile, read_adapter, write_adapter

    marked = []
    for name, expert in zip("ab", pair):
        saved = read_adapter(tmp_path / name)
        meta = json.loads(json.dumps(saved.meta))
        tensors = dict(saved.tensors)
        for module, info in meta["modules"].items():
            info["tensors"].append("note")
            tensors[f"{module}.note"] = torch.full((3,), float(len(module)))
        write_adapter(tmp_path / f"{name}-marked", AdapterFile(meta, tensors), overwrite=False)
        marked.append(ex.load_expert(tmp_path / f"{name}-marked", name))
    combined = read_adapter(ex.save_expert(ex.add(*marked), tmp_path / "sum"))
    for module in combined.meta["modules"]:
        assert torch.equal(combined.tensors[f"{module}.note"], torch.full((3,), float(len(module))))
        assert "note" in combined.meta["modules"][module]["tensors"]
    assert set(combined.tensors) == set(read_adapter(tmp_path / "a-marked").tensors)
