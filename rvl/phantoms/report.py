"""Free-text radiology reports for phantom studies, and the CheXpert-14 labels that follow from what they say.

The wording comes from ``grammar.yaml`` (data, not code). Every sentence carries the labels it asserts: positive (1)
for a described finding, uncertain (-1) for a hedged one, negative (0) for an explicit negation or a resolved finding.
Labels are aggregated CheXpert-style (positive > uncertain > negative > blank); "No Finding" is 1 only when nothing but
support devices is positive or uncertain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from rvl.constants import CHEXPERT_LABELS

__all__ = ["ReportItem", "load_grammar", "load_catalogue", "write_report"]

_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "marked": "markedly"}
_ORDINAL = {4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}
# Order in which findings are described (devices first, as in most reports), and importance for the impression.
_ORDER = ["endotracheal_tube", "central_line", "nasogastric_tube", "pacemaker", "pneumothorax", "consolidation",
          "retrocardiac_consolidation", "lung_opacity", "edema", "atelectasis", "lung_lesion", "pleural_effusion",
          "posterior_effusion", "pleural_thickening", "cardiomegaly", "widened_mediastinum", "rib_fracture"]
_IMPORTANCE = ["pneumothorax", "consolidation", "retrocardiac_consolidation", "edema", "pleural_effusion",
               "lung_lesion", "widened_mediastinum", "lung_opacity", "posterior_effusion", "cardiomegaly",
               "rib_fracture", "atelectasis", "pleural_thickening"]
_DEVICES = {"endotracheal_tube", "central_line", "nasogastric_tube", "pacemaker"}


@lru_cache(maxsize=1)
def load_grammar() -> dict:
    """The packaged report grammar (``rvl/phantoms/grammar.yaml``)."""
    import yaml

    return yaml.safe_load(resources.files("rvl.phantoms").joinpath("grammar.yaml").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def load_catalogue() -> dict:
    """The packaged finding catalogue (``rvl/phantoms/catalogue.yaml``)."""
    import yaml

    return yaml.safe_load(resources.files("rvl.phantoms").joinpath("catalogue.yaml").read_text(encoding="utf-8"))


@dataclass
class ReportItem:
    """One finding as the reader describes it in one study."""

    kind: str
    label: str
    side: str | None
    severity: float
    word: str                      # severity word ("small", "moderate", ...; may be "")
    change: str | None = None      # None (no comparison), new, unchanged, increased, improved, resolved
    hedged: bool = False
    slots: dict = field(default_factory=dict)


class _Labels:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, label: str, value: float) -> None:
        self.values.setdefault(label, []).append(float(value))

    def add_all(self, labels: dict) -> None:
        for label, value in (labels or {}).items():
            self.add(label, value)

    def state(self, label: str) -> float:
        vals = self.values.get(label)
        if not vals:
            return float("nan")
        return 1.0 if 1.0 in vals else (-1.0 if -1.0 in vals else 0.0)

    def final(self) -> dict[str, float]:
        out = {label: self.state(label) for label in CHEXPERT_LABELS}
        abnormal = any(out[label] in (1.0, -1.0) for label in CHEXPERT_LABELS if label not in ("No Finding",
                                                                                                  "Support Devices"))
        out["No Finding"] = float("nan") if abnormal else 1.0
        return out


class _Draws:
    """Uniform numbers from the study's Generator, drawn in batches: a report makes ~30 small random choices, and a
    numpy call for each would cost more than composing the text."""

    def __init__(self, rng: np.random.Generator, batch: int = 64):
        self._rng, self._batch = rng, batch
        self._buf, self._i = rng.random(batch).tolist(), 0

    def random(self) -> float:
        if self._i == len(self._buf):
            self._buf, self._i = self._rng.random(self._batch).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]

    def integers(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)


def _pick(rng: _Draws, options: list):
    return options[rng.integers(len(options))]


_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:])")


def _fill(template: str, slots: dict) -> str:
    """Format a template and tidy the spaces that empty slots (e.g. no severity word) leave behind."""
    text = " ".join(template.format_map(slots).split())
    if " ," in text or " ." in text or " ;" in text or " :" in text:
        text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = text.replace("- sided", "-sided")
    return text[:1].upper() + text[1:]


def _article(phrase: str) -> str:
    vowel_sound = phrase[:1].lower() in "aeiou" or phrase[:1] == "8" or phrase[:2] in ("11", "18") or \
        phrase[:3] in ("ET ", "NG ")
    return ("an " if vowel_sound else "a ") + phrase


def _template(entry) -> tuple[str, dict]:
    """A grammar entry is a string or {text, labels}."""
    return (entry["text"], entry.get("labels", {})) if isinstance(entry, dict) else (entry, {})


def _slots(item: ReportItem, kind_grammar: dict, grammar: dict, rng: _Draws, date: str | None) -> dict:
    """Slot values of one item, fixed for the whole report (so findings and impression agree)."""
    s = dict(item.slots)
    side = item.side or s.get("side_default", "right")
    s.update(side=grammar["sides"].get(side, side), size=item.word, size_adv=_ADVERB.get(item.word, item.word),
             date=date or "the prior study")
    if "zone_key" in s:
        s["zone"] = _pick(rng, grammar["zones"][s["zone_key"]][side if side in ("left", "right") else "right"])
    bilateral = item.side == "bilateral"
    mass = item.kind == "lung_lesion" and s.get("mass", False)
    suffix = "_bilateral" if bilateral else ("_mass" if mass else "")
    np_options = kind_grammar.get("np" + suffix) or kind_grammar["np"]
    plain_options = kind_grammar.get("np_plain" + suffix) or kind_grammar.get("np_plain") or np_options
    base = {k: v for k, v in s.items()}
    phrase = _fill(_pick(rng, np_options), base)
    phrase = phrase[:1].lower() + phrase[1:] if not phrase[:2].isupper() else phrase
    plain = _fill(_pick(rng, plain_options), base)
    plain = plain[:1].lower() + plain[1:] if not plain[:2].isupper() else plain
    a_np = phrase if kind_grammar.get("uncountable", False) or bilateral else _article(phrase)
    s.update(np=phrase, Np=phrase[:1].upper() + phrase[1:], a_np=a_np, A_np=a_np[:1].upper() + a_np[1:],
             np_plain=plain)
    return s


def _sentence(item: ReportItem, slots: dict, kind_grammar: dict, grammar: dict, rng: _Draws,
              labels: _Labels, impression: bool = False) -> str:
    """One sentence about one item, recording the labels it asserts."""
    bilateral = "_bilateral" if item.side == "bilateral" else ""
    value = 1.0
    if item.change == "resolved":
        pool, value = kind_grammar.get("resolved") or grammar["change"]["resolved"], 0.0
    elif item.hedged:
        pool, value = (grammar["impression"]["hedged"] if impression else
                       kind_grammar.get("hedged" + bilateral) or kind_grammar.get("hedged")), -1.0
    elif item.change == "new" and "new" in kind_grammar:
        pool = kind_grammar["new"]
    elif item.change is not None and item.kind not in _DEVICES:
        pool = grammar["change"][item.change]
    elif impression:
        pool = grammar["impression"]["present"]
    else:
        pool = kind_grammar.get("present" + bilateral) or kind_grammar["present"]
    text, extra = _template(_pick(rng, pool))
    if not (item.change == "resolved" and item.kind in _DEVICES):  # removing a tube says nothing about devices now
        labels.add(item.label, value)
    if not impression:
        labels.add_all(extra)
    return _fill(text, slots)


def _negations(grammar: dict, labels: _Labels, rng: _Draws, p: float) -> list[str]:
    out = []
    topics = grammar["negations"]
    chosen = set()
    for topic in ("effusion_pneumothorax", "pneumothorax", "effusion", "pneumonia", "consolidation", "edema", "heart",
                  "mediastinum", "lesion", "bones"):
        spec = topics[topic]
        if any(labels.state(lab) in (1.0, -1.0) for lab in spec["negates"]):
            continue
        if topic in ("pneumothorax", "effusion") and "effusion_pneumothorax" in chosen:
            continue
        if topic == "consolidation" and "pneumonia" in chosen:
            continue
        if rng.random() < p * (0.5 if topic in ("lesion", "bones", "mediastinum") else 1.0):
            chosen.add(topic)
            out.append(_pick(rng, spec["text"]))
            for lab in spec["negates"]:
                labels.add(lab, 0.0)
    return out


def _section(grammar: dict, name: str, body: str, rng: _Draws) -> str:
    header = _pick(rng, grammar["headers"][name])
    sep = "\n" if rng.random() < grammar["probabilities"]["newline_after_header"] else " "
    return f"{header}{sep}{body}"


def write_report(items: list[ReportItem], rng: np.random.Generator, view: str, has_lateral: bool,
                 prior_date: str | None, icu: bool = False) -> tuple[str, dict[str, float]]:
    """Compose the report of one study; returns ``(text, labels)`` with the 14 CheXpert labels (NaN = blank)."""
    grammar = load_grammar()
    prob = grammar["probabilities"]
    rng = _Draws(rng)
    labels = _Labels()
    items = sorted(items, key=lambda it: _ORDER.index(it.kind))
    slots = {id(it): _slots(it, grammar["kinds"][it.kind], grammar, rng, prior_date) for it in items}
    sentences = [_sentence(it, slots[id(it)], grammar["kinds"][it.kind], grammar, rng, labels) for it in items]
    lung_findings = any(it.change != "resolved" and it.kind not in _DEVICES | {"cardiomegaly", "widened_mediastinum",
                                                                                "rib_fracture", "pacemaker"}
                        for it in items)
    normal_bits = []
    if not lung_findings and rng.random() < prob["normal_statement"]:
        normal_bits.append(_pick(rng, grammar["normal_statements"]["lungs"]))
    negated = _negations(grammar, labels, rng, prob["negation_per_topic"] if items else 0.85)
    findings_text = " ".join(sentences[:sum(it.kind in _DEVICES for it in items)] + normal_bits +
                             sentences[sum(it.kind in _DEVICES for it in items):] + negated)
    if not findings_text:
        findings_text = _pick(rng, grammar["normal_statements"]["lungs"])
    # Impression: the most important current findings (hedged ones stay hedged), else a normal statement.
    ranked = [it for it in items if it.kind in _IMPORTANCE and it.change != "resolved"]
    ranked.sort(key=lambda it: _IMPORTANCE.index(it.kind))
    lines = [_sentence(it, slots[id(it)], grammar["kinds"][it.kind], grammar, rng, labels, impression=True)
             for it in ranked[:3]]
    devices = [it for it in items if it.kind in _DEVICES and it.change != "resolved"]
    if not lines:
        lines.append(_pick(rng, grammar["impression_normal"]))
        if devices and rng.random() < 0.5:
            lines.append(_pick(rng, grammar["impression_devices_ok"]))
    elif rng.random() < prob["otherwise_normal_impression"] and len(lines) < 3:
        lines.append(_pick(rng, grammar["impression_otherwise"]))
    if len(lines) > 1 and rng.random() < prob["numbered_impression"]:
        impression = "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
    else:
        impression = " ".join(lines)
    sections = []
    if rng.random() < prob["indication"]:
        followed = [it for it in items if it.change in ("unchanged", "increased", "improved")]
        if icu:
            text = _pick(rng, grammar["indication"]["icu"])
        elif followed and rng.random() < 0.4:
            text = _fill(_pick(rng, grammar["indication"]["follow_up"]), slots[id(followed[0])])
        else:
            text = _pick(rng, grammar["indication"]["generic"])
        sections.append(_section(grammar, "indication", text, rng))
    if rng.random() < prob["technique"]:
        key = view + ("_LAT" if has_lateral else "")
        sections.append(_section(grammar, "technique", _pick(rng, grammar["technique"][key]), rng))
    if prior_date is not None and rng.random() < prob["comparison_with_prior"]:
        sections.append(_section(grammar, "comparison", _fill(_pick(rng, grammar["comparison"]["prior"]),
                                                              {"date": prior_date}), rng))
    elif prior_date is None and rng.random() < prob["comparison_without_prior"]:
        sections.append(_section(grammar, "comparison", _pick(rng, grammar["comparison"]["none"]), rng))
    sections.append(_section(grammar, "findings", findings_text, rng))
    sections.append(_section(grammar, "impression", impression, rng))
    return "\n\n".join(sections), labels.final()
