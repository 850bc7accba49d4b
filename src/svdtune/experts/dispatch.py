"""Transformers²-style two-pass adaptation with SVF experts (arXiv 2501.06252 §3.2).

A first pass decides which SVF vector the model should run with; the second pass runs the query with it. Both
strategies swap vectors in place on a model that already holds SVF adapters (`ExpertMixer`): no re-adapt, no SVD.

* Prompt-based dispatch (`TwoPass.choose`): the model is asked which expert fits the query, and the answer is a
  constrained choice: the expert name (or `other`, meaning the base model) with the highest mean log-probability per
  token after the dispatch prompt. The first pass runs on the base model, or with a named `dispatcher` expert (the
  paper's classification expert); a user `classifier(query) -> name | None` replaces it entirely.
* Few-shot mixing (`TwoPass.fit_mixture`): mixing weights α (one per expert, or per expert and adapted matrix)
  searched by the cross-entropy method on a few labelled examples, then fixed: z' = neutral + Σ_k α_k (z_k − neutral)
  on the scales z (as in `svdtune.experts`: the paper's Σ_k α_k z_k for sigmoid experts, and for direct ones when
  Σα = 1). Fitness is accuracy over each
  example's choices with ties broken by the mean log-likelihood of the right answers, as in the official code, or
  the log-likelihood alone for examples without choices.

`TwoPass.generate` and `TwoPass.score` run both passes for one query (generation through the model's `generate()`,
scoring as log-probabilities of given continuations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arithmetic import Expert, check_compatible, svf_adapters, trained_vector

DISPATCH_TEMPLATE = "Which kind of task is this: {names}?\nTask: {query}\nKind:"


class ExpertMixer:
    """A model holding SVF adapters and named experts for it; switches or mixes their vectors in place."""

    def __init__(self, model: nn.Module, experts: Sequence[Expert]) -> None:
        check_compatible(experts)
        self.model = model
        self.names = [e.name for e in experts]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"expert names must be distinct, got {self.names}")
        self.adapters = svf_adapters(model, experts[0])
        self.modules = list(self.adapters)
        first = experts[0]
        self.key, self.neutral = first.key, first.neutral
        self.offsets = {}  # module -> (K, p) offsets of every expert's scales z, float64, on the parameter's device
        offsets = [e.offsets() for e in experts]
        for module, adapter in self.adapters.items():
            param = getattr(adapter, self.key)
            self.offsets[module] = torch.stack([o[module] for o in offsets]).to(param.device)

    def _set(self, module: str, z: torch.Tensor) -> None:
        param = getattr(self.adapters[module], self.key)
        param.copy_(trained_vector(self.key, z, module).to(param.dtype))

    def _enable(self, enabled: bool) -> None:
        for adapter in self.adapters.values():
            adapter.enabled = enabled

    @torch.no_grad()
    def use(self, name: str | None) -> None:
        """Run with expert `name`, or the base model for None."""
        if name is None:
            self._enable(False)
            return
        if name not in self.names:
            raise ValueError(f"unknown expert {name!r}; experts: {', '.join(self.names)}")
        k = self.names.index(name)
        for module in self.adapters:
            self._set(module, self.neutral + self.offsets[module][k])
        self._enable(True)

    @torch.no_grad()
    def mix(self, alpha: torch.Tensor) -> None:
        """Run with neutral + Σ_k α_k·offset_k; α has shape (K,) or (K, number of adapted matrices)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if alpha.shape not in ((len(self.names),), (len(self.names), len(self.modules))):
            raise ValueError(f"alpha must have shape ({len(self.names)},) or ({len(self.names)}, {len(self.modules)}) "
                             f"(experts x adapted matrices), got {tuple(alpha.shape)}")
        per_layer = alpha.expand(len(self.modules), -1).T if alpha.dim() == 1 else alpha
        for i, module in enumerate(self.adapters):
            self._set(module, self.neutral + per_layer[:, i].to(self.offsets[module].device) @ self.offsets[module])
        self._enable(True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(model: nn.Module, tokenizer: Any, prompt: str, continuations: Sequence[str]) -> list[float]:
    """Mean log-probability per token of each continuation after `prompt` (one padded batch through the model)."""
    prompt_ids = tokenizer.encode(prompt)
    conts = [tokenizer.encode(c, add_special_tokens=False) for c in continuations]
    if any(not c for c in conts):
        raise ValueError("every continuation must encode to at least one token")
    length = len(prompt_ids) + max(len(c) for c in conts)
    ids = torch.zeros(len(conts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, c in enumerate(conts):
        seq = prompt_ids + c
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    device = model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
    start = len(prompt_ids) - 1  # logits at position t predict token t + 1
    return [float(logp[row, start:start + len(c)].mean()) for row, c in enumerate(conts)]


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, **generate_kwargs: Any) -> str:
    """The model's `generate()` on one prompt; returns the decoded new tokens."""
    ids = torch.tensor([tokenizer.encode(prompt)], device=model_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generate_kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass(frozen=True)
class CEMConfig:
    population: int = 32  # candidates per iteration (Transformers²: 32)
    elite_ratio: float = 0.2  # fraction kept to refit the distribution (Transformers²: 0.2, i.e. 6 of 32)
    iterations: int = 50  # refits (Transformers²: 50)
    init_std: float = 0.5  # initial std of α, half the [0, 1] range (Transformers²)
    low: float = 0.0  # α is clipped to [low, high] (Transformers²: [0, 1])
    high: float = 1.0
    seed: int = 0  # seed of the sampling

    def __post_init__(self) -> None:
        if self.population < 2 or not 0 < self.elite_ratio <= 1 or self.iterations < 1:
            raise ValueError(f"CEM needs population >= 2, 0 < elite_ratio <= 1 and iterations >= 1, got {self}")
        if not self.low < self.high or self.init_std <= 0:
            raise ValueError(f"CEM needs low < high and init_std > 0, got low={self.low}, high={self.high}, "
                             f"init_std={self.init_std}")


@dataclass
class CEMResult:
    best: torch.Tensor  # the best candidate seen
    fitness: Any  # its fitness
    history: list[Any] = field(default_factory=list)  # best fitness after each iteration


def cem(fitness: Callable[[torch.Tensor], Any], init_mean: torch.Tensor, config: CEMConfig = CEMConfig()) -> CEMResult:
    """Maximise `fitness` (a float, or a tuple compared lexicographically) with the cross-entropy method.

    Each iteration samples `population` candidates from N(mean, std²) clipped to [low, high], keeps the best
    `elite_ratio` of them and refits mean and std to those elites (no smoothing). The best candidate ever seen is
    returned; the fitness is assumed deterministic, so it is not re-evaluated.
    """
    gen = torch.Generator().manual_seed(config.seed)
    mean = init_mean.double().clone()
    std = torch.full_like(mean, config.init_std)
    n_elite = max(1, int(config.population * config.elite_ratio))
    result: CEMResult | None = None
    history = []
    for _ in range(config.iterations):
        noise = torch.randn((config.population, *mean.shape), generator=gen, dtype=torch.float64)
        samples = (mean + std * noise).clamp(config.low, config.high)
        scores = [fitness(s) for s in samples]
        order = sorted(range(config.population), key=lambda i: scores[i], reverse=True)
        if result is None or scores[order[0]] > result.fitness:
            result = CEMResult(samples[order[0]].clone(), scores[order[0]])
        history.append(result.fitness)
        elites = samples[order[:n_elite]]
        mean, std = elites.mean(0), elites.std(0, unbiased=False)
    result.history = history
    return result


@dataclass(frozen=True)
class Example:
    """A labelled few-shot example: `answer` is the right continuation, `choices` (if any) the candidates."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.choices and self.answer not in self.choices:
            raise ValueError(f"the answer {self.answer!r} is not among the choices {self.choices}")


def few_shot_fitness(model: nn.Module, tokenizer: Any, examples: Sequence[Example]) -> tuple[float, ...]:
    """(accuracy over the examples with choices, mean log-likelihood of the right answers) for the current weights;
    without any choices just (mean log-likelihood,)."""
    correct, logliks, with_choices = 0, [], 0
    for ex in examples:
        if ex.choices:
            scores = continuation_logprobs(model, tokenizer, ex.prompt, ex.choices)
            right = ex.choices.index(ex.answer)
            correct += int(max(range(len(scores)), key=scores.__getitem__) == right)
            with_choices += 1
            logliks.append(scores[right])
        else:
            logliks.append(continuation_logprobs(model, tokenizer, ex.prompt, [ex.answer])[0])
    mean_ll = sum(logliks) / len(logliks)
    return (correct / with_choices, mean_ll) if with_choices else (mean_ll,)


class TwoPass:
    """Two-pass inference over named SVF experts on one adapted model (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, experts: Sequence[Expert] | Mapping[str, Expert], *,
                 classifier: Callable[[str], str | None] | None = None, template: str = DISPATCH_TEMPLATE,
                 dispatcher: str | None = None, other: str = "other") -> None:
        if isinstance(experts, Mapping):
            experts = [Expert(name, e.file) for name, e in experts.items()]
        self.mixer = ExpertMixer(model, experts)
        self.model, self.tokenizer = model, tokenizer
        self.classifier, self.template, self.dispatcher, self.other = classifier, template, dispatcher, other
        if other in self.mixer.names:
            raise ValueError(f"{other!r} names the base model in dispatch; rename that expert or pass other=...")
        if dispatcher is not None and dispatcher not in self.mixer.names:
            raise ValueError(f"dispatcher {dispatcher!r} is not one of the experts {self.mixer.names}")
        self.mixture: torch.Tensor | None = None

    def choose(self, query: str) -> str | None:
        """First pass: the expert for `query`, or None for the base model."""
        if self.classifier is not None:
            choice = self.classifier(query)
            if choice is not None and choice not in self.mixer.names:
                raise ValueError(f"the classifier chose {choice!r}, which is not one of {self.mixer.names} or None")
            return choice
        candidates = [*self.mixer.names, self.other]
        prompt = self.template.format(names=", ".join(candidates), query=query)
        self.mixer.use(self.dispatcher)
        scores = continuation_logprobs(self.model, self.tokenizer, prompt, [f" {c}" for c in candidates])
        best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
        return None if best == self.other else best

    def prepare(self, query: str) -> str | None:
        """Set the model's vectors for `query`: the fitted mixture if there is one, else the dispatched expert.
        Returns the expert used (None: base model or mixture)."""
        if self.mixture is not None:
            self.mixer.mix(self.mixture)
            return None
        choice = self.choose(query)
        self.mixer.use(choice)
        return choice

    def fit_mixture(self, examples: Sequence[Example], config: CEMConfig = CEMConfig(), *,
                    per_layer: bool = False) -> CEMResult:
        """Search α by CEM on `examples`, keep it for later queries, and leave the model running with it."""
        if not examples:
            raise ValueError("few-shot mixing needs at least one labelled example")
        k = len(self.mixer.names)
        shape = (k, len(self.mixer.modules)) if per_layer else (k,)

        def fitness(alpha: torch.Tensor) -> tuple[float, ...]:
            self.mixer.mix(alpha)
            return few_shot_fitness(self.model, self.tokenizer, examples)

        result = cem(fitness, torch.full(shape, 1.0 / k), config)
        self.mixture = result.best
        self.mixer.mix(self.mixture)
        return result

    def generate(self, query: str, **generate_kwargs: Any) -> str:
        self.prepare(query)
        return generate_text(self.model, self.tokenizer, query, **generate_kwargs)

    def score(self, query: str, continuations: Sequence[str]) -> list[float]:
        self.prepare(query)
        return continuation_logprobs(self.model, self.tokenizer, query, continuations)
