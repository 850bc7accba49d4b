"""Initialisation time: `svdtune.adapt` on the embedded SmolLM2-135M (the 210 q/k/v/o/gate/up/down matrices) for
every method, without the factor cache, cold (the first run fills it) and warm (the second reads it), side by side
with PEFT's SVD/QR inits of the same model in the same run; then the scaling of one matrix's factorisation from
512² to 4096², exact vs randomized, with a log-log plot.

    python benchmarks/init_time.py [--device cpu|cuda] [--r 8] [--sizes 512 1024 2048 4096]
                                   [--out benchmarks/results/init_time.json]

"Cold" includes hashing the weights and writing the factors; "warm" is hashing plus reading them. PEFT's times are
`get_peft_model` with `init_lora_weights` = "pissa" (exact SVD), "pissa_niter_4"/"pissa_niter_16" (torch's
randomized `svd_lowrank`, no oversampling) and "olora", on a fresh copy of the model each. The scaling part factors
one n x n matrix with a decaying spectrum (σ_i ∝ 1/i, like trained weights): exact thin SVD, svdtune's randomized SVD
(r = 8 + 8 oversampling, 4 power iterations), and `torch.svd_lowrank` (PEFT's routine, q = r, 4 iterations); the
accuracy column is the rank-r reconstruction error relative to the exact SVD's (1.0 = optimal).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from harness import markdown_table, peft_model, write_result

import svdtune
from svdtune.data.models import load_model
from svdtune.linalg import randomized_svd, svd
from svdtune.methods import rank_option

# Every registered method with its defaults, plus PiSSA's randomized SVD at PEFT's two usual iteration counts.
VARIANTS: dict[str, tuple[str, dict]] = {name: (name, {}) for name in svdtune.METHODS}
VARIANTS.update({"pissa niter=4": ("pissa", {"niter": 4}), "pissa niter=16": ("pissa", {"niter": 16})})
PEFT_INITS = ("pissa", "pissa_niter_4", "pissa_niter_16", "olora")
# svdtune's init vs PEFT's at the same SVD accuracy.
COUNTERPARTS = {"pissa": "pissa", "pissa niter=4": "pissa_niter_4", "pissa niter=16": "pissa_niter_16",
                "olora": "olora"}


def timed_adapt(model: torch.nn.Module, method: str, options: dict, r: int, cache: bool | str) -> dict:
    start = time.perf_counter()
    svdtune.adapt(model, method, cache=cache, verbose=False, progress=False, **rank_option(method, r), **options)
    seconds = time.perf_counter() - start
    summary = model.svdtune_summary
    svdtune.unload(model)
    return {"seconds": round(seconds, 3), "factor_seconds": round(summary.factor_seconds, 3),
            "cache_hits": summary.cache_hits, "trainable": summary.trainable}


def timed_peft(base: torch.nn.Module, init: str, r: int) -> float:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    peft_model(model, init, r)
    return round(time.perf_counter() - start, 3)


def model_inits(args: argparse.Namespace) -> tuple[dict, dict, str]:
    model, _ = load_model("smollm2-135m")
    model.to(args.device)
    ours = {}
    for label, (method, options) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as cache:
            ours[label] = {"no_cache": timed_adapt(model, method, options, args.r, False),
                           "cold": timed_adapt(model, method, options, args.r, cache),
                           "warm": timed_adapt(model, method, options, args.r, cache)}
        print(label, ours[label], flush=True)
    peft = {init: timed_peft(model, init, args.r) for init in PEFT_INITS}
    print("peft", peft, flush=True)
    versus = {f"{label} / peft {init}": {"cold_x_peft": round(ours[label]["cold"]["seconds"] / peft[init], 3),
                                         "warm_x_peft": round(ours[label]["warm"]["seconds"] / peft[init], 3)}
              for label, init in COUNTERPARTS.items()}
    table = markdown_table(["svdtune / PEFT, same SVD accuracy", "cold cache", "warm cache"],
                           [[k, v["cold_x_peft"], v["warm_x_peft"]] for k, v in versus.items()])
    table += "\n" + markdown_table(
        [f"svdtune method (r={args.r}, 210 matrices)", "no cache s", "cold cache s", "warm cache s",
         "of which SVD/QR (cold) s"],
        [[k, v["no_cache"]["seconds"], v["cold"]["seconds"], v["warm"]["seconds"], v["cold"]["factor_seconds"]]
         for k, v in ours.items()])
    table += "\n" + markdown_table(["PEFT init_lora_weights", "get_peft_model s"], list(peft.items()))
    return {"svdtune": ours, "peft": peft}, versus, table


def decaying_matrix(n: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    left, right = (torch.randn(n, n, generator=generator) / n**0.5 for _ in range(2))
    return ((left / torch.arange(1, n + 1)) @ right).to(device)


def timed(function, repeats: int = 1):  # noqa: ANN001, ANN201
    result, best = None, float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def scaling(args: argparse.Namespace) -> tuple[list[dict], str]:
    rows = []
    r = args.r
    for n in args.sizes:
        W = decaying_matrix(n, args.device)
        exact, exact_s = timed(lambda: svd(W))
        optimal = torch.linalg.matrix_norm(W - (exact.U[:, :r] * exact.S[:r]) @ exact.Vh[:r])
        ours, ours_s = timed(lambda: randomized_svd(W, r, niter=4), repeats=3)
        (U, S, V), torch_s = timed(lambda: torch.svd_lowrank(W, q=r, niter=4), repeats=3)

        def relative(U_, S_, Vh_) -> float:
            return round(float(torch.linalg.matrix_norm(W - (U_ * S_) @ Vh_) / optimal), 4)

        rows.append({"n": n, "exact_s": round(exact_s, 4), "randomized_s": round(ours_s, 4),
                     "svd_lowrank_s": round(torch_s, 4), "randomized_error_x_optimal": relative(*ours),
                     "svd_lowrank_error_x_optimal": relative(U, S, V.T)})
        print(rows[-1], flush=True)
    table = markdown_table(["n x n", "exact SVD s", f"svdtune randomized r={r} s", f"torch.svd_lowrank q={r} s",
                            "svdtune error / optimal", "svd_lowrank error / optimal"],
                           [[row["n"], row["exact_s"], row["randomized_s"], row["svd_lowrank_s"],
                             row["randomized_error_x_optimal"], row["svd_lowrank_error_x_optimal"]] for row in rows])
    return rows, table


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["n"] for row in rows]
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for key, label in (("exact_s", "exact thin SVD"), ("randomized_s", "svdtune randomized (r+8, 4 iter)"),
                       ("svd_lowrank_s", "torch.svd_lowrank (q=r, 4 iter)")):
        axes.loglog(sizes, [row[key] for row in rows], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("matrix size n (n x n)")
    axes.set_ylabel("seconds")
    axes.set_title("Factorisation time of one matrix")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    for suffix in (".png", ".svg"):
        figure.savefig(path.with_suffix(suffix), dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--out", default="benchmarks/results/init_time.json")
    args = parser.parse_args()
    start = time.perf_counter()
    inits, versus, table = model_inits(args)
    rows, scaling_table = scaling(args)
    plot_scaling(rows, Path(args.out).with_name("init_scaling"))
    settings = {"model": "smollm2-135m", "modules": 210, "device": args.device, "r": args.r,
                "wall_seconds": round(time.perf_counter() - start, 1)}
    write_result(args.out, "init_time", settings, {"versus_peft": versus, "model": inits, "scaling": rows},
                 table + "\n" + scaling_table + "\n![init scaling](init_scaling.png)\n")


if __name__ == "__main__":
    main()
