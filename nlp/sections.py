"""Radiology report sections: ``extract_sections(text) -> {"findings": ..., "impression": ..., ...}``.

Headers come from ``resources/sections.yaml`` (MIMIC-CXR section_parser normalisation map + NegBio titles + IU X-ray /
CheXpert spellings). A header is recognised at the start of a line or after a sentence end, followed by ``:`` (or
`` - `` at a line start, or alone on its own line for the common headers), case-insensitively. Fallbacks follow the
MIMIC-CXR parser: without findings/impression headers the last paragraph of the free text is the impression (earlier
paragraphs are findings); text after a blank line in an indication/comparison/technique section is free text, not part
of that section; boilerplate lines ("FINAL REPORT") are dropped; wet reads, addenda and notifications go to ``other``.
De-identification placeholders (``___``, ``XXXX``) are ordinary text.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

SECTION_KEYS = ("findings", "impression", "indication", "comparison", "technique", "recommendation", "other")
_RESOURCE = Path(__file__).parent / "resources" / "sections.yaml"
# Sections whose header introduces a short field: a blank line ends them and what follows is free report text.
_SHORT_SECTIONS = {"indication", "comparison", "technique"}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


class SectionVocabulary:
    """Compiled header vocabulary (one regex over all header spellings, longest first)."""

    def __init__(self, spec: dict[str, Any]):
        self.key_of: dict[str, str] = {}
        for key, names in spec["headers"].items():
            if key not in SECTION_KEYS:
                raise ValueError(f"sections vocabulary: unknown section key {key!r} (use one of {SECTION_KEYS})")
            for name in names:
                self.key_of[_norm_header(str(name))] = key
        self.standalone = {_norm_header(str(n)) for n in spec.get("standalone_ok", [])}
        self.boilerplate = {_norm_header(str(n)) for n in spec.get("boilerplate_lines", [])}
        alternation = "|".join(
            re.escape(name).replace(r"\ ", r"\s+") for name in sorted(self.key_of, key=len, reverse=True))
        # Start of a line (after optional indentation) or after a sentence end; then the header; then a colon,
        # " - " (line start only, checked in code) or the end of the line (standalone headers, checked in code).
        self.pattern = re.compile(
            r"(?:^[ \t]*|(?<=[.!?;] )|(?<=[.!?;]  )|(?<=[.!?;]   ))"
            rf"(?P<header>{alternation})(?P<sep>[ \t]*:|[ \t]+-[ \t]+|[ \t]*(?=\n|$))",
            re.IGNORECASE | re.MULTILINE)
        self.boilerplate_pattern = re.compile(
            r"^[ \t]*(?:" + "|".join(re.escape(b).replace(r"\ ", r"\s+") for b in self.boilerplate)
            + r")[ \t]*:?[ \t]*$",
            re.IGNORECASE | re.MULTILINE) if self.boilerplate else None


def _norm_header(name: str) -> str:
    return " ".join(name.lower().split())


@functools.lru_cache(maxsize=8)
def load_section_vocabulary(path: str | None = None) -> SectionVocabulary:
    """Load and compile a header vocabulary YAML (default: the packaged ``resources/sections.yaml``)."""
    with open(path or _RESOURCE, encoding="utf-8") as f:
        return SectionVocabulary(yaml.safe_load(f))


def _at_line_start(text: str, pos: int) -> bool:
    line_start = text.rfind("\n", 0, pos) + 1
    return not text[line_start:pos].strip()


def _is_title_line(paragraph: str) -> bool:
    """A short all-caps line such as "CHEST PA AND LATERAL": a title, not report prose."""
    letters = [c for c in paragraph if c.isalpha()]
    return (len(paragraph) <= 60 and bool(letters) and all(c.isupper() for c in letters)
            and "\n" not in paragraph.strip())


def find_headers(text: str, vocabulary: SectionVocabulary | None = None) -> list[tuple[int, int, str]]:
    """Return ``(start, end, key)`` for each section header in ``text`` (``end`` = where the content starts)."""
    vocab = vocabulary or load_section_vocabulary()
    headers = []
    for m in vocab.pattern.finditer(text):
        name = _norm_header(m.group("header"))
        sep = m.group("sep").strip()
        if not sep and (name not in vocab.standalone or not _at_line_start(text, m.start("header"))):
            continue  # "gives the impression of" / "These findings were": not headers
        if sep == "-" and not _at_line_start(text, m.start("header")):
            continue
        headers.append((m.start("header"), m.end(), vocab.key_of[name]))
    return headers


def extract_sections(text: Any, vocabulary: SectionVocabulary | None = None) -> dict[str, str]:
    """Split a radiology report into normalised sections.

    Args:
        text: The full report. Non-strings and blank strings give ``{}``.
        vocabulary: A compiled header vocabulary (default: packaged; see ``load_section_vocabulary``).

    Returns:
        Dict from section key (``findings, impression, indication, comparison, technique, recommendation, other``) to
        the stripped section text; only non-empty sections, several same-key sections joined by a newline.
    """
    if not isinstance(text, str) or not text.strip():
        return {}
    vocab = vocabulary or load_section_vocabulary()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if vocab.boilerplate_pattern is not None:
        text = vocab.boilerplate_pattern.sub("", text)
    headers = find_headers(text, vocab)
    parts: dict[str, list[str]] = {}
    free_text: list[str] = []  # text outside any section: preamble, or after a blank line in a short section

    def add(key: str, content: str) -> None:
        content = content.strip()
        if content:
            parts.setdefault(key, []).append(content)

    if not headers:
        free_text.append(text)
    else:
        free_text.append(text[:headers[0][0]])
    for i, (_, content_start, key) in enumerate(headers):
        content = text[content_start:headers[i + 1][0] if i + 1 < len(headers) else len(text)]
        if key in _SHORT_SECTIONS:
            first, *rest = _PARAGRAPH_BREAK.split(content.strip(), maxsplit=1)
            add(key, first)
            free_text.extend(rest)
        else:
            add(key, content)

    paragraphs = [p.strip() for chunk in free_text for p in _PARAGRAPH_BREAK.split(chunk) if p.strip()]
    if paragraphs:
        if "impression" not in parts and "findings" not in parts:
            # MIMIC-CXR fallback: the last paragraph of free text is the impression.
            add("impression", paragraphs[-1])
            for p in paragraphs[:-1]:
                add("findings", p)
        else:
            has_findings = "findings" in parts
            for p in paragraphs:
                add("other" if has_findings or _is_title_line(p) else "findings", p)
    ordered = {key: "\n".join(parts[key]) for key in SECTION_KEYS if key in parts}
    return ordered


def select_text(text: Any, sections: tuple[str, ...] | list[str] | None, strict: bool = False,
                vocabulary: SectionVocabulary | None = None) -> str:
    """The text to label: the requested sections joined by blank lines (in the order asked).

    Without ``sections`` the whole report is returned. If none of the requested sections exists, the whole report is
    used unless ``strict`` (then ``""``), like the CheXpert labeler's ``--extract_strict``.
    """
    if not isinstance(text, str):
        return ""
    if not sections:
        return text
    found = extract_sections(text, vocabulary)
    chosen = [found[s] for s in sections if s in found]
    if chosen:
        return "\n\n".join(chosen)
    return "" if strict else text
