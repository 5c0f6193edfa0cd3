"""Observation mentions: the ``rvl_mentions`` spaCy component (PhraseMatcher/Matcher on lower-cased tokens).

The vocabulary (``resources/observations.yaml`` or a user YAML with the same layout) lists, per CheXpert observation,
mention phrases/patterns and "unmention" phrases/patterns; a mention overlapping an unmention of the same observation is
dropped, and overlapping mentions of one observation keep the longest. Mentions of different observations may overlap
("nodular opacity" is both Lung Lesion and Lung Opacity, as in CheXpert).

Output: ``doc._.rvl_mentions`` = list of ``[observation, start_token, end_token, uncertain(0/1), implies]`` where
``implies`` is a list of ``[label, value]`` (CheXpert's CHF rule), all msgpack-serialisable so ``nlp.pipe(n_process=N)``
can ship docs between processes.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from spacy.language import Language
from spacy.attrs import LOWER
from spacy.matcher import Matcher, PhraseMatcher
from spacy.tokens import Doc

from rvl.constants import CHEXPERT_LABELS

OTHER_ABNORMALITY = "Other Abnormality"  # not an output column: blocks "No Finding" when positive/uncertain
DEFAULT_OBSERVATIONS = Path(__file__).parent / "resources" / "observations.yaml"

if not Doc.has_extension("rvl_mentions"):
    Doc.set_extension("rvl_mentions", default=None)


def file_key(path: str | None) -> tuple:
    """Cache key for a resource path that changes when the file does (path, mtime, size)."""
    if not path:
        return (None, 0, 0)
    stat = os.stat(path)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def load_observations(path: str | None = None) -> dict[str, dict[str, list]]:
    """Read an observation vocabulary YAML -> ``{observation: {"mention": [...], "unmention": [...]}}``.

    Observation names must be CheXpert labels (except "No Finding", which is derived) or custom names; the
    ``other_abnormalities`` block becomes the internal observation ``"Other Abnormality"``.
    """
    return _load_observations(*file_key(path))


@functools.lru_cache(maxsize=8)
def _load_observations(path: str | None, _mtime: int, _size: int) -> dict[str, dict[str, list]]:
    source = Path(path) if path else DEFAULT_OBSERVATIONS
    with open(source, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    observations = dict(spec.get("observations") or {})
    if spec.get("other_abnormalities"):
        observations[OTHER_ABNORMALITY] = spec["other_abnormalities"]
    if not observations:
        raise ValueError(f"{source}: no 'observations' mapping")
    if "No Finding" in observations:
        raise ValueError(f"{source}: 'No Finding' is derived from the other observations, not matched")
    for name, block in observations.items():
        for kind in ("mention", "unmention"):
            for entry in (block or {}).get(kind) or []:
                _check_entry(entry, f"{source}: {name}/{kind}")
    return {name: {"mention": list((b or {}).get("mention") or []), "unmention": list((b or {}).get("unmention") or [])}
            for name, b in observations.items()}


def _check_entry(entry: Any, where: str) -> None:
    if isinstance(entry, str):
        return
    if isinstance(entry, dict) and (isinstance(entry.get("phrase"), str) or isinstance(entry.get("pattern"), list)):
        return
    raise ValueError(f"{where}: entry {entry!r} must be a phrase string or {{phrase: str}} / {{pattern: [...]}} "
                     "(quote YAML words like \"no\" that would become booleans)")


MAX_EXPANSION = 5000


def expand_pattern(pattern: list[dict]) -> list[list[str]] | None:
    """All word sequences a LOWER/ORTH token pattern (ops "?" or none) can match, or None if not finite/too many.

    Such patterns are added to the PhraseMatcher instead of the Matcher: the same matches, ~10x faster.
    """
    sequences: list[list[str]] = [[]]
    for spec in pattern:
        if set(spec) - {"LOWER", "ORTH", "OP"} or spec.get("OP") not in (None, "?"):
            return None
        value = spec.get("LOWER", spec.get("ORTH"))
        if isinstance(value, str):
            options = [value]
        elif isinstance(value, dict) and set(value) == {"IN"}:
            options = list(value["IN"])
        else:
            return None
        options = [str(o).lower() for o in options] + ([None] if spec.get("OP") == "?" else [])
        sequences = [seq + ([o] if o is not None else []) for seq in sequences for o in options]
        if len(sequences) > MAX_EXPANSION:
            return None
    return [seq for seq in sequences if seq]


def add_patterns(phrase_matcher: PhraseMatcher, matcher: Matcher, match_key: str, patterns: list[list[dict]],
                 vocab) -> list[list[dict]]:
    """Add token patterns: finite ones as phrases, the rest to the Matcher (returned, for ``pattern_anchors``)."""
    left = []
    for pattern in patterns:
        sequences = expand_pattern(pattern)
        if sequences is None:
            left.append(pattern)
        else:
            phrase_matcher.add(match_key, [Doc(vocab, words=words) for words in sequences])
    if left:
        matcher.add(match_key, left)
    return left


def add_rule_groups(nlp, phrase_matcher: PhraseMatcher, matcher: Matcher, groups: dict, prefix: str
                    ) -> tuple[dict[int, tuple], np.ndarray | None]:
    """Register grouped rule entries (``{"phrase": ...}`` or ``{"pattern": [...]}``) under one match key per group.

    Returns (match id -> group key, anchors for :func:`run_gated`). Shared by the mention and the context components.
    """
    keys: dict[int, tuple] = {}
    all_patterns: list = []
    for i, (key, entries) in enumerate(groups.items()):
        match_key = f"{prefix}_{i}"
        keys[nlp.vocab.strings.add(match_key)] = key
        phrases = [e["phrase"].lower() for e in entries if "phrase" in e]
        if phrases:
            phrase_matcher.add(match_key, list(nlp.tokenizer.pipe(phrases)))
        patterns = [e["pattern"] for e in entries if "pattern" in e]
        if patterns:
            all_patterns.extend(add_patterns(phrase_matcher, matcher, match_key, patterns, nlp.vocab))
    return keys, pattern_anchors(all_patterns, nlp.vocab.strings)


def pattern_anchors(patterns: list[list[dict]], strings) -> np.ndarray | None:
    """Hashes of words of which every token pattern needs at least one (its most selective required token).

    The Matcher is ~10x slower than the PhraseMatcher, so it only runs on docs containing an anchor word. ``None``
    when some pattern has no lower-case word constraint (then the Matcher always runs).
    """
    words: set[str] = set()
    for pattern in patterns:
        best = None
        for spec in pattern:
            if spec.get("OP") in ("?", "*", "!"):
                continue
            value = spec.get("LOWER", spec.get("ORTH"))
            options = [value] if isinstance(value, str) else value.get("IN") if isinstance(value, dict) else None
            if options and (best is None or len(options) < len(best)):
                best = options
        if best is None:
            return None
        words.update(w.lower() for w in best)
    return np.array(sorted(strings.add(w) for w in words), dtype=np.uint64)


def run_gated(matcher: Matcher, anchors: np.ndarray | None, doc: Doc, lowers: np.ndarray | None = None) -> list:
    """``matcher(doc)`` only if the doc contains an anchor word (see ``pattern_anchors``)."""
    if not len(matcher):
        return []
    if anchors is not None:
        lowers = doc.to_array(LOWER) if lowers is None else lowers
        if not np.isin(lowers, anchors).any():
            return []
    return list(matcher(doc))


class MentionMatcher:
    """Find observation mentions; see module docstring. Built by ``nlp.add_pipe("rvl_mentions")``."""

    def __init__(self, nlp: Language, name: str, observations: str | None = None):
        self.name = name
        self.observations_path = observations
        vocabulary = load_observations(observations)
        self.phrase_matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        self.matcher = Matcher(nlp.vocab)
        # match key -> (observation, is_unmention, uncertain, implies)
        self.entries: dict[int, tuple[str, bool, int, list]] = {}
        groups: dict[tuple, list] = {}
        for obs, block in vocabulary.items():
            for kind in ("mention", "unmention"):
                for entry in block[kind]:
                    entry = {"phrase": entry} if isinstance(entry, str) else entry
                    implies = sorted((str(k), float(v)) for k, v in (entry.get("implies") or {}).items())
                    key = (obs, kind == "unmention", int(bool(entry.get("uncertain"))), tuple(implies))
                    groups.setdefault(key, []).append(entry)
        keys, self.anchors = add_rule_groups(nlp, self.phrase_matcher, self.matcher, groups, "rvl_obs")
        for match_id, (obs, unmention, uncertain, implies) in keys.items():
            self.entries[match_id] = (obs, unmention, uncertain, [list(x) for x in implies])
        self.labels = [o for o in vocabulary if o != OTHER_ABNORMALITY]

    def __call__(self, doc: Doc) -> Doc:
        matches = list(self.phrase_matcher(doc)) + run_gated(self.matcher, self.anchors, doc)
        found: dict[str, list] = {}
        blocked: dict[str, list] = {}
        for match_id, start, end in matches:
            obs, unmention, uncertain, implies = self.entries[match_id]
            (blocked if unmention else found).setdefault(obs, []).append((start, end, uncertain, implies))
        mentions = []
        for obs, spans in found.items():
            spans.sort(key=lambda s: (s[0] - s[1], s[0]))  # longest first
            taken: list[tuple[int, int]] = []
            for start, end, uncertain, implies in spans:
                if any(start < b_end and b_start < end for b_start, b_end, *_ in blocked.get(obs, ())):
                    continue
                if any(start < t_end and t_start < end for t_start, t_end in taken):
                    continue
                taken.append((start, end))
                mentions.append([obs, start, end, uncertain, implies])
        mentions.sort(key=lambda m: (m[1], m[2]))
        doc._.rvl_mentions = mentions
        return doc


@Language.factory("rvl_mentions", default_config={"observations": None})
def make_mention_matcher(nlp: Language, name: str, observations: str | None) -> MentionMatcher:
    """spaCy factory: ``nlp.add_pipe("rvl_mentions", config={"observations": "my_observations.yaml"})``."""
    return MentionMatcher(nlp, name, observations)


def known_labels(observations: str | None = None) -> list[str]:
    """Output labels for a vocabulary: CheXpert order first, then any custom observations."""
    names = [o for o in load_observations(observations) if o != OTHER_ABNORMALITY]
    return ["No Finding"] + [l for l in CHEXPERT_LABELS if l in names] + [o for o in names if o not in CHEXPERT_LABELS]
