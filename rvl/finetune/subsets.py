"""Label-fraction subsets of the training split, drawn by patient (REFERS's 1 / 10 / 100 % protocol).

A subset is a list of patient ids. It is a function of (training patients, labels, fraction, seed) only: the patients
are put in one order by a generator seeded with ``seed`` (the same order for every fraction, so the subsets of one
seed nearly nest), every chosen label first gets the earliest patient in that order with a positive study (rarest
label first: that is what "stratified" guarantees, positives of every label even at 1 %), then the order fills the
subset up to ``ceil(fraction * patients)``. The stratification may add patients beyond that count for tiny fractions;
the real count is recorded with the list.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rvl.fileio import write_text_atomic

__all__ = ["draw_patient_subset", "subset_file", "write_subset", "read_subset", "subset_hash"]


def _patient_positives(frame: Any, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted patient ids of ``frame`` and a (patients, labels) bool array: any study of the patient is positive."""
    patients = frame["patient_id"].astype(str).to_numpy()
    values = frame[list(labels)].to_numpy(dtype=np.float64, na_value=np.nan)
    positive = values == 1.0
    ids, inverse = np.unique(patients, return_inverse=True)
    per_patient = np.zeros((len(ids), len(labels)), dtype=bool)
    np.logical_or.at(per_patient, inverse, positive)
    return [str(p) for p in ids], per_patient


def draw_patient_subset(frame: Any, labels: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Patient ids of a ``fraction`` of the patients in ``frame`` (the training split), stratified by label.

    Args:
        frame: Studies with ``patient_id`` and the label columns (1 positive, 0 negative, -1 uncertain, NaN blank).
        labels: Labels that must each have at least one positive patient in the subset.
        fraction: Share of the patients, in (0, 1]; 1 returns every patient.
        seed: Seed of the patient order.

    Returns:
        Sorted patient ids.

    Raises:
        ValueError: A bad fraction, or a label without any positive study in ``frame``.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    patients, positives = _patient_positives(frame, labels)
    missing = [label for j, label in enumerate(labels) if not positives[:, j].any()]
    if missing:
        raise ValueError(f"no positive training study for label(s) {missing}: drop them from --labels")
    if float(fraction) == 1.0:
        return patients
    order = np.random.default_rng([int(seed), 20_211_102]).permutation(len(patients))
    target = max(1, math.ceil(float(fraction) * len(patients)))
    chosen: list[int] = []
    taken = np.zeros(len(patients), dtype=bool)
    for j in np.argsort(positives.sum(axis=0), kind="stable"):  # rarest label first
        if positives[chosen, j].any():
            continue
        first = next(int(i) for i in order if positives[i, j])
        chosen.append(first)
        taken[first] = True
    for i in order:
        if len(chosen) >= target:
            break
        if not taken[i]:
            chosen.append(int(i))
            taken[i] = True
    return sorted(patients[i] for i in chosen)


def subset_file(out_dir: str | os.PathLike, fraction: float, seed: int) -> Path:
    """``OUT/subsets/patients_<fraction>_seed<k>.txt``."""
    return Path(out_dir) / "subsets" / f"patients_{float(fraction):g}_seed{int(seed)}.txt"


def subset_hash(patients: Sequence[str]) -> str:
    """SHA-256 (first 16 hex digits) of the list as written to disk: identical lists, identical hashes."""
    return hashlib.sha256(("\n".join(patients) + "\n").encode()).hexdigest()[:16]


def write_subset(path: str | os.PathLike, patients: Sequence[str]) -> str:
    """Write one patient id a line (atomically) and return the list's hash.

    An existing file with a different list is an error: a rerun must train on exactly the subsets it recorded.
    """
    path = Path(path)
    text = "\n".join(patients) + "\n"
    if path.is_file() and path.read_bytes() != text.encode():  # bytes: a damaged file may not even be UTF-8
        raise ValueError(f"{path} holds a different patient list than this run draws (other data, labels or "
                         "seeds, or a damaged file: delete it to draw it again); use a new --output-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_text_atomic(path, text)
    return subset_hash(patients)


def read_subset(path: str | os.PathLike) -> list[str]:
    """Patient ids of a subset file (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
