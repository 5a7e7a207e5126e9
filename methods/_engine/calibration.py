"""Calibration windows from C4, sampled the way upstream Wanda and SparseGPT do.

Mirrors `get_c4` in locuslab/wanda `lib/data.py` (itself from IST-DASLab/sparsegpt
`datautils.py`): with the random generator seeded once, repeatedly pick a random document,
keep it if its tokenized length exceeds `seqlen`, and cut a random window of `seqlen`
tokens out of it; `nsamples` such windows make the calibration set. A private
`random.Random(seed)` draws exactly the stream `random.seed(seed)` gives upstream's module-
level calls, without touching the global generator.

Two departures, both only where upstream would misbehave: a document found too short is
remembered so it is never tokenized twice, and when every document has been found too short
the sampler raises instead of looping forever.

Sources: a local JSON-lines file with a `text` field (the slice the driver stages under
`/data/hf/allenai__c4/en/train.jsonl`), whose sha256 is returned so the job records exactly
what it used; or the hub shard upstream reads (`allenai/c4`, `en/c4-train.00000-of-01024.json.gz`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

C4_HUB_ID = "allenai/c4"
C4_HUB_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"


class CalibrationError(ValueError):
    """The calibration source cannot give the requested windows."""


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: torch.Tensor  # LongTensor [nsamples, seqlen]
    source: str
    data_sha256: str | None  # of the local file; None for the hub


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_documents(path: Path) -> list[str]:
    """The `text` field of every line of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found: stage the C4 slice there or use the hub source")
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{number}: not a JSON object with a 'text' field") from None
    if not documents:
        raise CalibrationError(f"calibration file {path} holds no documents")
    return documents


class _HubColumn(Sequence):
    """The `text` column of a hub dataset, read lazily (the shard has ~356k documents)."""

    def __init__(self, dataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        return self._dataset[i]["text"]


def hub_c4_documents() -> Sequence[str]:
    """The C4 training shard upstream calibrates on (without the retired 'allenai--c4'
    config name, as SparseGPT commit e9dae34 fixed it)."""
    from datasets import load_dataset

    dataset = load_dataset(C4_HUB_ID, data_files={"train": C4_HUB_TRAIN_FILE}, split="train")
    return _HubColumn(dataset)


def sample_windows(documents: Sequence[str], tokenizer, *, nsamples: int, seqlen: int, seed: int = 0,
                   source: str = "documents") -> torch.Tensor:
    """`nsamples` random `seqlen`-token windows of random documents longer than `seqlen`."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"calibration needs nsamples >= 1 and seqlen >= 1, got {nsamples} x {seqlen}")
    if len(documents) == 0:
        raise CalibrationError(f"{source} holds no documents")
    rng = random.Random(seed)
    too_short: dict[int, int] = {}
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(documents) - 1)
            if i in too_short:
                continue
            tokens = tokenizer(documents[i], return_tensors="pt").input_ids
            if tokens.shape[1] > seqlen:
                break
            too_short[i] = tokens.shape[1]
            if len(too_short) == len(documents):
                longest = max(too_short.values())
                raise CalibrationError(
                    f"no document in {source} has more than {seqlen} tokens (the longest has {longest}): "
                    f"use a calibration seqlen below {longest}"
                )
        start = rng.randint(0, tokens.shape[1] - seqlen - 1)
        windows.append(tokens[:, start:start + seqlen])
    return torch.cat(windows, dim=0).long()


def sample_distinct_windows(documents: Sequence[str], tokenizer, *, nsamples: int, seqlen: int, seed: int,
                            source: str = "documents") -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens from distinct random documents of at least `seqlen`
    tokens: LLM-Pruner's draw of its Taylor examples (`get_examples` in horseee/LLM-Pruner
    `LLMPruner/datasets/example_samples.py`, the same loop for its C4 and BookCorpus). It
    differs from `sample_windows` in three places: a document may have exactly `seqlen` tokens
    (`>=`), none is drawn twice, and the window starts anywhere in `0 .. len - seqlen` (on long
    documents the two mostly agree: `randint` draws the same bits for both ranges unless their
    bit lengths differ). With the generator seeded as `hf_prune.py` seeds `random` (its
    `--seed`, before any other draw), the same documents and tokenizer give upstream's
    examples, so the two engines' Taylor importances see the same tokens."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"examples need nsamples >= 1 and seqlen >= 1, got {nsamples} x {seqlen}")
    rng = random.Random(seed)
    lengths: dict[int, int] = {}
    history: list[int] = []
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(documents) - 1)
            tokens = tokenizer(documents[i], return_tensors="pt").input_ids
            lengths[i] = tokens.shape[1]
            if tokens.shape[1] >= seqlen and i not in history:
                history.append(i)
                break
            usable = [j for j, n in lengths.items() if n >= seqlen and j not in history]
            if len(lengths) == len(documents) and not usable:  # upstream would loop forever
                raise CalibrationError(f"{source} has no more distinct documents of at least {seqlen} tokens "
                                       f"({len(history)} drawn of {nsamples}): lower the examples' count or length")
        start = rng.randint(0, tokens.shape[1] - seqlen)
        windows.append(tokens[:, start:start + seqlen])
    return torch.cat(windows, dim=0).long()


def calibration_documents(data_file: Path | str | None) -> tuple[Sequence[str], str, str | None]:
    """(documents, source, sha256 of the local file or None): a local JSON-lines file, or the
    hub's C4 shard when `data_file` is None."""
    if data_file is None:
        return hub_c4_documents(), f"hub:{C4_HUB_ID}/{C4_HUB_TRAIN_FILE}", None
    data_file = Path(data_file)
    return local_documents(data_file), str(data_file), file_sha256(data_file)


def sample_calibration(tokenizer, *, nsamples: int, seqlen: int, seed: int = 0,
                       data_file: Path | str | None = None) -> CalibrationSet:
    """C4 calibration windows from a local JSON-lines file, or from the hub when `data_file` is None."""
    documents, source, sha = calibration_documents(data_file)
    ids = sample_windows(documents, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, source=source)
    return CalibrationSet(ids, source, sha)


def load_calibration(tokenizer, data_file: Path | str | None, *, nsamples: int, seqlen: int,
                     seed: int = 0) -> tuple[torch.Tensor, str | None]:
    """(input ids [nsamples, seqlen], sha256 of the local file or None for the hub): the
    shape the job process consumes."""
    calibration = sample_calibration(tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, data_file=data_file)
    return calibration.input_ids, calibration.data_sha256
