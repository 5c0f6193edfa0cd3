"""Feeding the bad-input corpus (:mod:`rvl.bad_inputs`) to rvl's readers and commands, and judging each outcome.

A command runs in this process through ``rvl.cli.main`` with its output captured; an exception escaping it, or the word
"Traceback" in what it printed, is a failure, like an exit 0 on input that must be refused ("silent") or a refusal
that does not name the file or row ("wrong-message").
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rvl.bad_inputs import Case, good_images

__all__ = ["ENTRIES", "Outcome", "run_case", "run_cli", "run_prepare_batch"]


@dataclass
class Outcome:
    """``verdict``: refused / accepted / skipped (all fine) or traceback / silent / wrong-message (failures)."""

    verdict: str
    code: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict in ("refused", "accepted", "skipped")


def run_cli(argv: list[str]) -> Outcome:
    """Run ``rvl ARGV`` in this process; ``verdict`` is filled by the caller, ``traceback`` when it raised."""
    import logging

    from rvl.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # noqa: BLE001 - an escaped exception is exactly what the corpus hunts for
        return Outcome("traceback", None, f"{type(exc).__name__}: {exc}")
    finally:
        logging.getLogger().removeHandler(handler)
    text = err.getvalue()
    return Outcome("traceback" if "Traceback" in text else "", code, text, {"stdout": out.getvalue()})


# -------------------------------------------------------------------------------------------------------- the harness
ENTRIES = {"image": ("read", "zeroshot", "prepare", "prepare-strict"), "manifest": ("prepare", "index"),
           "reports": ("label",)}


def _refusal(case: Case, outcome: Outcome) -> Outcome:
    if outcome.verdict == "traceback":
        return outcome
    if outcome.code == 0:
        outcome.verdict = "silent"
    elif outcome.code == 2 and case.token in outcome.message:
        outcome.verdict = "refused"
    else:
        outcome.verdict = "wrong-message"
    return outcome


def run_case(case: Case, entry: str, work: Path, model_dir: Path | None = None) -> Outcome:
    """Feed one case to one entry (see ``ENTRIES``) and judge the outcome against ``case.expect``."""
    work.mkdir(parents=True, exist_ok=True)
    refuse = case.expect in ("error", "degenerate") if entry == "zeroshot" else case.expect == "error"
    if entry == "read":
        return _read(case)
    if entry == "zeroshot":
        outcome = run_cli(["zeroshot", "--model", str(model_dir), "--images", str(case.path), "--json"])
    elif entry == "prepare-strict":
        manifest = _image_manifest([case], work)
        outcome = run_cli(["prepare", str(manifest), "--out", str(work / "strict"), "--strict", "--workers", "0",
                           "--no-progress"])
    elif entry == "prepare":
        outcome = run_cli(["prepare", str(case.path), "--out", str(work / "cache"), "--workers", "0",
                           "--no-progress", "--size", "32"])
    elif entry == "index":
        outcome = run_cli(["index", "build", "--model", str(model_dir), "--data", str(case.path), "--out",
                           str(work / "index"), "--device", "cpu"])
    elif entry == "label":
        out = work / (case.path.stem + ".labels.csv")
        outcome = run_cli(["label", str(case.path), "--output", str(out), "--no-progress"])
        if not refuse and outcome.verdict != "traceback" and outcome.code == 0:
            return _labelled(case, outcome, out)
    else:
        raise ValueError(f"unknown entry {entry!r}")
    if refuse:
        return _refusal(case, outcome)
    if outcome.verdict != "traceback":
        outcome.verdict = "accepted" if outcome.code == 0 else "wrong-message"
    return outcome


def _read(case: Case) -> Outcome:
    from rvl.data.io import ImageReadError, read_image

    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = read_image(case.path)
    except ImageReadError as exc:
        good = case.expect == "error" and str(case.path) in str(exc)
        return Outcome("refused" if good else "wrong-message", 2, str(exc))
    except Exception as exc:  # noqa: BLE001
        return Outcome("traceback", None, f"{type(exc).__name__}: {exc}")
    valid = image.dtype == np.float32 and image.ndim == 2 and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    return Outcome("accepted" if case.expect != "error" and valid else "silent", 0, f"shape {image.shape}")


def _labelled(case: Case, outcome: Outcome, out: Path) -> Outcome:
    from rvl.integrity import check_sidecar

    try:
        rows = len(pd.read_csv(out, dtype=object, keep_default_na=False))
        check_sidecar(out)
    except Exception as exc:  # noqa: BLE001
        return Outcome("silent", outcome.code, f"output unreadable: {exc}")
    outcome.verdict = "accepted" if rows == case.rows else "silent"
    outcome.extra["rows"] = rows
    return outcome


def _image_manifest(cases: list[Case], work: Path) -> Path:
    """A manifest: one good study, then one study per image case (so a strict run fails on the case, not before)."""
    from rvl.data.manifest import write_manifest

    good = good_images(work / "good")[0]
    paths = [[str(good)], *[[str(c.path)] for c in cases]]
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(len(paths))],
                          "study_id": [f"s{i}" for i in range(len(paths))], "image_paths": paths,
                          "view_positions": [["PA"]] * len(paths), "report": ["FINDINGS: clear."] * len(paths)})
    write_manifest(frame, work)
    return work / "manifest.parquet"


def run_prepare_batch(cases: list[Case], work: Path) -> dict[str, Outcome]:
    """One ``rvl prepare`` over a manifest holding every image case as its own study: each bad image must be
    skipped and listed in skipped.csv (a counted skip), each readable one kept."""
    manifest = _image_manifest(cases, work)
    outcome = run_cli(["prepare", str(manifest), "--out", str(work / "cache"), "--workers", "0", "--no-progress",
                       "--size", "32"])
    if outcome.verdict == "traceback" or outcome.code != 0:
        return {c.name: Outcome(outcome.verdict or "wrong-message", outcome.code, outcome.message) for c in cases}
    skipped = set(pd.read_csv(work / "cache" / "skipped.csv", dtype=str)["path"])
    results = {}
    for case in cases:
        listed = str(case.path) in skipped
        good = listed if case.expect == "error" else not listed
        results[case.name] = Outcome(("skipped" if listed else "accepted") if good else "silent", 0,
                                     "listed in skipped.csv" if listed else "kept in the cache")
    return results
