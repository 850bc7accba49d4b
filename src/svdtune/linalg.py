"""The linear algebra every SVD/QR-based adapter shares, in one place.

Why this module exists: five methods (PiSSA, MiLoRA, LoRA-XS, and later SVF/SVFT) start from the SVD of the same
frozen weights, OLoRA from their QR. Doing it once, right, is the point:

* factorisations run in float32 or float64 on an unquantised copy, never in the weight's bf16/fp16;
* signs are canonicalised (largest-|.| entry of each left singular vector positive, the matching right vector
  flipped; diag(R) of a QR positive), so the same weight always gives the same factors;
* a `Factorizer` caches factors on disk, keyed by a hash of the weight bytes, so trying several SVD methods on one
  model (or re-running a script) pays for one SVD per matrix; it also counts the seconds spent factorising, which
  `adapt` reports.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .paths import cache_root, write_atomic

FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SVD(NamedTuple):
    """Thin SVD W = U diag(S) Vh with U: m x k, S: k (descending), Vh: k x n."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class QR(NamedTuple):
    """Reduced QR W = Q R with Q: m x p (orthonormal columns), R: p x n, diag(R) >= 0."""

    Q: torch.Tensor
    R: torch.Tensor


def factor_dtype(name: str) -> torch.dtype:
    """Map a config's `factor_dtype` string to a torch dtype, with an error that lists the choices."""
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype={name!r} is not supported; use one of {sorted(FACTOR_DTYPES)} "
                         "(SVD/QR in half precision is inaccurate or unsupported)")
    return FACTOR_DTYPES[name]


def working_copy(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W in `dtype`, or in W's own dtype when that is more precise (a float64 weight is never factored in float32)."""
    return W.detach().to(torch.promote_types(W.dtype, dtype))


def canonicalize_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of every column of U is positive.

    A singular pair (u, v) is only defined up to a joint sign; fixing it makes factors reproducible across runs and
    libraries (up to degenerate singular values, which no convention can fix).
    """
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def svd(W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> SVD:
    """Exact thin SVD of W in `dtype` (at least), with canonical signs."""
    U, S, Vh = torch.linalg.svd(working_copy(W, dtype), full_matrices=False)
    U, Vh = canonicalize_signs(U, Vh)
    return SVD(U, S, Vh)


def randomized_svd(W: torch.Tensor, rank: int, *, niter: int, oversample: int = 8, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> SVD:
    """Top-`rank` SVD by randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    `niter` power iterations sharpen the captured subspace when the spectrum decays slowly (each one re-orthonormalises,
    so float32 stays stable). `oversample` extra columns make the top-`rank` part accurate even with few iterations;
    PEFT's `pissa_niter_K` uses none. The test matrix is drawn from a seeded generator, so results are reproducible.
    """
    A = working_copy(W, dtype)
    m, n = A.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=A.dtype, device=A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U, Vh = canonicalize_signs(Q @ Ub[:, :rank], Vh[:rank])
    return SVD(U, S[:rank], Vh)


def qr(W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> QR:
    """Reduced QR of W in `dtype` (at least), with diag(R) >= 0 so the factorisation is unique for full-rank W."""
    Q, R = torch.linalg.qr(working_copy(W, dtype), mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return QR(Q * signs, R * signs[:, None])


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: the identity of a frozen weight."""
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(_raw_bytes(t))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    return memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def default_cache_dir() -> Path:
    """`$SVDTUNE_CACHE_DIR/factors`, else `~/.cache/svdtune/factors`."""
    return cache_root() / "factors"


class Factorizer:
    """SVD/QR front end for adapters: disk cache keyed by weight hash, plus accounting of time spent.

    `cache_dir=None` disables the cache. Entries are safetensors files named by the hash of (weight bytes, which
    factorisation, its parameters), so a changed weight can never hit a stale entry. The exact SVD is cached in full
    (all min(m, n) triplets), so PiSSA at any rank, MiLoRA and LoRA-XS share one entry per matrix. Each entry
    records the digest of its weight, its parameters and a checksum of its tensors, all verified before use: a bit
    flip, a truncated file or an entry copied from another matrix is recomputed, never used.
    """

    def __init__(self, cache_dir: Path | str | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seconds = 0.0
        self.hits = 0
        self.misses = 0

    def svd(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> SVD:
        return SVD(*self._cached(W, {"kind": "svd", "dtype": str(dtype)}, lambda: svd(W, dtype=dtype)))

    def randomized_svd(self, W: torch.Tensor, rank: int, *, niter: int, dtype: torch.dtype = torch.float32) -> SVD:
        key = {"kind": "randomized_svd", "rank": rank, "niter": niter, "dtype": str(dtype)}
        return SVD(*self._cached(W, key, lambda: randomized_svd(W, rank, niter=niter, dtype=dtype)))

    def top_svd(self, W: torch.Tensor, rank: int, *, niter: int | None,
                dtype: torch.dtype = torch.float32) -> SVD:
        """The top-`rank` triplets: sliced from the exact SVD (`niter=None`) or by randomized SVD with `niter`."""
        if niter is None:
            U, S, Vh = self.svd(W, dtype=dtype)
            return SVD(U[:, :rank], S[:rank], Vh[:rank])
        return self.randomized_svd(W, rank, niter=niter, dtype=dtype)

    def qr(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> QR:
        return QR(*self._cached(W, {"kind": "qr", "dtype": str(dtype)}, lambda: qr(W, dtype=dtype)))

    def _cached(self, W: torch.Tensor, key: dict, compute: Callable[[], tuple]) -> tuple:
        start = time.perf_counter()
        path, stamp = None, {}
        if self.cache_dir is not None:
            stamp = {"weight": tensor_digest(W), "key": json.dumps(key, sort_keys=True)}
            name = hashlib.sha256((stamp["weight"] + stamp["key"]).encode()).hexdigest()
            path = self.cache_dir / f"{name}.safetensors"
            stored = self._read_entry(path, stamp, W.device)
            if stored is not None:
                self.hits += 1
                self.seconds += time.perf_counter() - start
                return stored
        result = compute()
        self.misses += 1
        if path is not None:
            self._write_entry(path, stamp, result)
        self.seconds += time.perf_counter() - start
        return result

    @staticmethod
    def _read_entry(path: Path, stamp: dict[str, str], device: torch.device) -> tuple | None:
        """The factors cached at `path` if the entry is whole and was made from this weight with these parameters;
        None otherwise (a damaged, foreign or stale entry is deleted, to be recomputed and rewritten)."""
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                stored = tuple(f.get_tensor(str(i)) for i in range(len(list(f.keys()))))
        except Exception:  # any unreadable entry is recomputed, never trusted
            stored, meta = (), {}
        whole = stored and meta.get("checksum") == tensors_checksum(stored)
        if whole and all(meta.get(k) == v for k, v in stamp.items()):
            return stored
        path.unlink(missing_ok=True)
        return None

    def _write_entry(self, path: Path, stamp: dict[str, str], result: tuple) -> None:
        """Cache `result` with its checksum; a cache directory that cannot be written is reported once and turned
        off for this Factorizer, since the factors themselves are fine."""
        tensors = {str(i): t.contiguous().cpu() for i, t in enumerate(result)}
        metadata = {**stamp, "checksum": tensors_checksum(tuple(tensors.values()))}
        try:
            write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        except OSError as e:
            warnings.warn(f"svdtune cannot write its factor cache in {self.cache_dir} ({e.strerror or e}); "
                          "continuing without it (set SVDTUNE_CACHE_DIR to a writable directory, or pass cache=False)",
                          CacheWarning, stacklevel=2)
            self.cache_dir = None


class CacheWarning(UserWarning):
    """The on-disk factor cache could not be used; results are unaffected, only the time to recompute them."""


def tensors_checksum(tensors: Iterable[torch.Tensor]) -> str:
    """A CRC-32 over some tensors' dtypes, shapes and bytes, in order: the integrity check of cache entries and
    checkpoints. It detects damage (bit flips, truncation), not tampering, at several times the speed of sha256, so a
    warm cache stays fast; which weight an entry belongs to is told by the weight's sha256 beside it."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(f"{t.dtype}:{tuple(t.shape)}:".encode(), crc)
        crc = zlib.crc32(_raw_bytes(t), crc)
    return f"crc32:{crc:08x}"


class ShapeFactorizer(Factorizer):
    """Factors of the right shapes and dtypes on the meta device, computing nothing: building an adapter with it on
    a meta weight tells which tensors (names, shapes, dtypes) a method makes for a config, at no cost."""

    def __init__(self) -> None:
        super().__init__(None)

    def svd(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> SVD:
        return self._svd(W, min(W.shape), dtype)

    def randomized_svd(self, W: torch.Tensor, rank: int, *, niter: int, dtype: torch.dtype = torch.float32) -> SVD:
        return self._svd(W, rank, dtype)

    def qr(self, W: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> QR:
        (m, n), p, acc = W.shape, min(W.shape), torch.promote_types(W.dtype, dtype)
        return QR(torch.empty(m, p, dtype=acc, device="meta"), torch.empty(p, n, dtype=acc, device="meta"))

    @staticmethod
    def _svd(W: torch.Tensor, k: int, dtype: torch.dtype) -> SVD:
        (m, n), acc = W.shape, torch.promote_types(W.dtype, dtype)
        return SVD(*(torch.empty(*shape, dtype=acc, device="meta") for shape in ((m, k), (k,), (k, n))))
