"""Report-level aggregation of mention statuses, CheXpert rules.

Per observation: any positive -> 1.0; else any uncertain -> -1.0 (so {0, -1} -> -1); else negative -> 0.0; no mention ->
NaN. Mentions carrying ``implies`` (CheXpert's CHF rule: "chf" / "heart failure" positive or uncertain) add an
uncertain mention of the implied label. "No Finding" = 1.0 when no observation other than Support Devices -- including
the "Other Abnormality" list (emphysema, granuloma, scoliosis, hernia, ...) -- is positive or uncertain; else NaN
(never 0, as in CheXpert).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from rvl.constants import CHEXPERT_LABELS

NAN = math.nan
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
STATUS_NAME = {1: "positive", 0: "negative", -1: "uncertain"}


def blank_row(labels: Iterable[str] = CHEXPERT_LABELS) -> dict[str, float]:
    """All-NaN labels (unlabelled / invalid report)."""
    return {label: NAN for label in labels}


def aggregate_assertions(assertions: list[list[Any]], labels: list[str] = CHEXPERT_LABELS,
                         with_evidence: bool = False) -> tuple[dict[str, float], dict[str, list[dict]] | None]:
    """Turn ``doc._.rvl_assertions`` into one label row (and optionally the evidence behind each label).

    Args:
        assertions: ``[observation, start_char, end_char, text, status, cue_text, cue_category, implies]`` lists.
        labels: Output columns (``No Finding`` is derived; other names not in ``labels`` are ignored except for the
            No Finding rule).
        with_evidence: Also return ``{label: [{"text", "start", "end", "status", "cue", "cue_category"}...]}``.
    """
    statuses: dict[str, list[int]] = {}
    evidence: dict[str, list[dict]] | None = {} if with_evidence else None
    for obs, start, end, text, status, cue, category, implies in assertions:
        statuses.setdefault(obs, []).append(status)
        if evidence is not None:
            evidence.setdefault(obs, []).append({"text": text, "start": start, "end": end,
                                                 "status": STATUS_NAME[status], "cue": cue, "cue_category": category})
        if implies and status in (1, -1):
            for label, value in implies:
                statuses.setdefault(label, []).append(int(value))
                if evidence is not None:
                    evidence.setdefault(label, []).append({
                        "text": text, "start": start, "end": end, "status": STATUS_NAME[int(value)],
                        "cue": f"implied by {obs} mention '{text}' (CheXpert CHF rule)", "cue_category": "rule"})
    row = blank_row(labels)
    any_finding = False
    for obs, values in statuses.items():
        value = 1.0 if 1 in values else (-1.0 if -1 in values else 0.0)
        if obs in row and obs != NO_FINDING:
            row[obs] = value
        if obs != SUPPORT_DEVICES and value != 0.0:
            any_finding = True
    if NO_FINDING in row:
        row[NO_FINDING] = NAN if any_finding else 1.0
    if evidence is not None:
        if NO_FINDING in row and row[NO_FINDING] == 1.0:
            evidence[NO_FINDING] = [{"text": "", "start": -1, "end": -1, "status": "positive",
                                     "cue": "no positive or uncertain finding other than support devices",
                                     "cue_category": "rule"}]
        evidence = {k: v for k, v in evidence.items() if k in row or k == NO_FINDING or k.startswith("Other")}
    return row, evidence
