"""ConText-style negation / uncertainty with CheXpert precedence: the ``rvl_context`` spaCy component.

Cues (``resources/context.yaml``) are matched on lower-cased tokens; overlapping cues keep the longest ("no new" beats
"no", "cannot be excluded" beats "not"; pseudo cues like "no change" only block). Each mention from ``rvl_mentions``
gets the status of the first category in the precedence list -- pre-negation uncertainty, negation, post-negation
uncertainty -- that has a cue whose scope covers it; otherwise positive (or uncertain for mentions marked uncertain).
Scopes stay inside the sentence and stop at termination cues ("but", "however", ";") and after a window of tokens;
forward scopes also stop at the next forward cue of another category; backward scopes stop at a comma unless the words
in between form a list ("heart, vasculature and mediastinum are normal").

Output: ``doc._.rvl_assertions`` = list of
``[observation, start_char, end_char, text, status, cue_text, cue_category, implies]`` (status 1 / 0 / -1), plain
lists/strings/numbers so docs survive ``nlp.pipe(n_process=N)``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from spacy.attrs import IDX, LENGTH, LOWER, SENT_START
from spacy.language import Language
from spacy.matcher import Matcher, PhraseMatcher
from spacy.tokens import Doc

from .mentions import add_rule_groups, file_key, run_gated

DEFAULT_CUES = Path(__file__).parent / "resources" / "context.yaml"
STATUS_OF = {"pre_negation_uncertainty": -1, "negation": 0, "post_negation_uncertainty": -1}
DIRECTIONS = ("forward", "backward", "both", "self")
_LIST_WORDS = frozenset({"and", "or", "nor", "and/or"})

if not Doc.has_extension("rvl_assertions"):
    Doc.set_extension("rvl_assertions", default=None)


def load_cues(path: str | None = None) -> dict[str, Any]:
    """Read a cue YAML (default: packaged ``resources/context.yaml``) and check its layout."""
    return _load_cues(*file_key(path))


@functools.lru_cache(maxsize=8)
def _load_cues(path: str | None, _mtime: int, _size: int) -> dict[str, Any]:
    source = Path(path) if path else DEFAULT_CUES
    with open(source, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    precedence = spec.get("precedence") or list(STATUS_OF)
    for category in precedence:
        if category not in STATUS_OF:
            raise ValueError(f"{source}: unknown category {category!r} in precedence")
        for direction, entries in (spec.get(category) or {}).items():
            if direction not in DIRECTIONS:
                raise ValueError(f"{source}: {category}/{direction}: direction must be one of {DIRECTIONS}")
            for entry in entries or []:
                if not (isinstance(entry, str) or (isinstance(entry, dict) and (
                        isinstance(entry.get("phrase"), str) or isinstance(entry.get("pattern"), list)))):
                    raise ValueError(f"{source}: {category}/{direction}: bad cue {entry!r} (quote YAML booleans "
                                     "such as \"no\")")
    for category in ("pseudo", "pseudo_in_scope", "termination"):
        for entry in spec.get(category) or []:
            if not isinstance(entry, str):
                raise ValueError(f"{source}: {category}: cue {entry!r} must be a string")
    return spec


class ConTextComponent:
    """Assign 1 / 0 / -1 to each mention; see the module docstring. ``nlp.add_pipe("rvl_context")``."""

    def __init__(self, nlp: Language, name: str, cues: str | None = None):
        self.name = name
        self.cues_path = cues
        spec = load_cues(cues)
        self.precedence = [c for c in spec.get("precedence") or list(STATUS_OF)]
        self.rank = {c: i for i, c in enumerate(self.precedence)}
        default_window = int(spec.get("window", 10))
        self.phrase_matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        self.matcher = Matcher(nlp.vocab)
        # match id -> (category, direction, forward window, backward window, only-labels or None)
        self.cue_info: dict[int, tuple[str, str, int, int, frozenset | None]] = {}
        groups: dict[tuple, list] = {}
        for category in self.precedence:
            for direction, entries in (spec.get(category) or {}).items():
                for entry in entries or []:
                    entry = {"phrase": entry} if isinstance(entry, str) else entry
                    window = entry.get("window", default_window)
                    fwd, bwd = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
                    only = frozenset(entry["only"]) if entry.get("only") else None
                    groups.setdefault((category, direction, fwd, bwd, only), []).append(entry)
        for category in ("pseudo", "pseudo_in_scope", "termination"):
            entries = [{"phrase": p} for p in spec.get(category) or []]
            if entries:
                groups[(category, "none", 0, 0, None)] = entries
        keys, self.anchors = add_rule_groups(nlp, self.phrase_matcher, self.matcher, groups, "rvl_cue")
        self.cue_info.update(keys)
        self.list_words = np.array([nlp.vocab.strings.add(w) for w in _LIST_WORDS], dtype=np.uint64)
        self.comma = np.uint64(nlp.vocab.strings.add(","))

    def _cues(self, doc: Doc, lowers: np.ndarray) -> list[tuple[int, int, int]]:
        matches = list(self.phrase_matcher(doc)) + run_gated(self.matcher, self.anchors, doc, lowers)
        # Longest wins; "self" cues (which contain the mention) never block phrase cues.
        matches.sort(key=lambda m: (m[1] - m[2], m[1]))
        kept: list[tuple[int, int, int]] = []
        for match_id, start, end in matches:
            if self.cue_info[match_id][1] != "self" and any(
                    start < e and s < end and self.cue_info[k][1] != "self" for k, s, e in kept):
                continue
            kept.append((match_id, start, end))
        kept.sort(key=lambda m: m[1])
        return kept

    def __call__(self, doc: Doc) -> Doc:
        mentions = doc._.rvl_mentions or []
        if not mentions:
            doc._.rvl_assertions = []
            return doc
        lowers = doc.to_array(LOWER)
        cues = self._cues(doc, lowers)
        # Sentence bounds per token from the sentence splitter's SENT_START flags (numpy: no Token objects).
        n = len(doc)
        starts = np.flatnonzero(doc.to_array(SENT_START) == 1)
        if not len(starts) or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        bounds = np.append(starts, n)
        sent_index = np.searchsorted(starts, np.arange(n), side="right") - 1
        is_comma = lowers == self.comma
        scoped = []  # (category, direction, cue_start, cue_end, lo, hi, only)
        for k, s, e in cues:
            category, direction, fwd, bwd, only = self.cue_info[k]
            if category in ("termination", "pseudo", "pseudo_in_scope"):
                continue
            lo, hi = s, e
            sent = sent_index[s]
            if direction in ("forward", "both"):
                hi = min(int(bounds[sent + 1]), e + fwd)
                for k2, s2, _ in cues:  # the next termination or forward cue of another category ends the scope
                    if e <= s2 < hi:
                        c2, d2 = self.cue_info[k2][0], self.cue_info[k2][1]
                        if c2 in ("termination", "pseudo") or (c2 != category and d2 == "forward"):
                            hi = s2
                            break
            if direction in ("backward", "both"):
                lo = max(int(bounds[sent]), s - bwd)
                for k2, s2, e2 in cues:  # a termination or another cue before this one ends the backward scope
                    if lo < e2 <= s and self.cue_info[k2][0] not in ("pseudo", "pseudo_in_scope") and \
                            self.cue_info[k2][1] != "self":
                        lo = e2
                # A comma ends it too, unless the words between the comma and the cue contain a list conjunction.
                commas = np.flatnonzero(is_comma[lo:s])
                if len(commas):
                    last = lo + int(commas[-1])
                    if not np.isin(lowers[last + 1:s], self.list_words).any():
                        lo = last + 1
            scoped.append((category, direction, s, e, lo, hi, only))
        scoped.sort(key=lambda c: self.rank[c[0]])
        assertions = []
        offsets = doc.to_array([IDX, LENGTH]).astype(np.int64)
        text = doc.text

        def chars(start: int, end: int) -> tuple[int, int]:
            return int(offsets[start, 0]), int(offsets[end - 1, 0] + offsets[end - 1, 1])

        for obs, m_start, m_end, uncertain, implies in mentions:
            status, cue_text, cue_category = (-1 if uncertain else 1), "", ""
            for category, direction, s, e, lo, hi, only in scoped:
                if only is not None and obs not in only:
                    continue
                if m_start < e and s < m_end:  # the cue contains (part of) the mention: "stable heart size"
                    hit = direction == "self"
                elif direction == "self":
                    hit = False
                else:
                    hit = (e <= m_start < hi) or (lo < m_end <= s)
                if hit:
                    cue_first, cue_last = chars(s, e)
                    status, cue_text, cue_category = STATUS_OF[category], text[cue_first:cue_last], category
                    break
            first, last = chars(m_start, m_end)
            assertions.append([obs, first, last, text[first:last], status, cue_text, cue_category, implies])
        doc._.rvl_assertions = assertions
        return doc


@Language.factory("rvl_context", default_config={"cues": None})
def make_context(nlp: Language, name: str, cues: str | None) -> ConTextComponent:
    """spaCy factory: ``nlp.add_pipe("rvl_context", config={"cues": "my_cues.yaml"})`` after ``rvl_mentions``."""
    return ConTextComponent(nlp, name, cues)
