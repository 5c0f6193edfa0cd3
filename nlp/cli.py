"""``rvl label``: label radiology reports (sections + the 14 CheXpert observations), streaming.

    rvl label INPUT [--output OUT] [--text-column COL] [--id-column COL] [--sections impression,findings]
              [--evidence] [--write-sections] [--workers N [--parallel pool|spacy]] [--chunk-size N]

INPUT: CSV / Parquet / JSONL with a header row (text column default ``report``), or a CheXpert-labeler-style headerless
one-column CSV. OUTPUT (CSV or Parquet by extension; default ``INPUT_STEM.labels.csv|parquet`` next to INPUT): id and
text columns + the 14 label columns (+ ``evidence`` JSON, + ``section_<key>`` columns when asked). Memory stays
constant: CSV is read in chunks, Parquet by record batches, JSONL line by line, and output is appended chunk by chunk
to a temporary file that replaces OUTPUT at the end; ``OUTPUT.sha256`` records its checksum. Bad rows
never stop the run and are never dropped.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

CSV_SUFFIXES = (".csv", ".csv.gz", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz")


class InputError(Exception):
    """Bad user input: reported as one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="CSV / Parquet / JSONL file of reports (or a headerless one-column CSV)")
    parser.add_argument("-o", "--output", help="output .csv or .parquet (default: INPUT_STEM.labels.<ext> next to "
                        "INPUT)")
    parser.add_argument("--text-column", default=None, help="column holding the report text (default: report)")
    parser.add_argument("--id-column", default=None, help="id column that must exist (it is copied to the output)")
    parser.add_argument("--keep-columns", default="all",
                        help="input columns copied to the output next to the labels: all (default; users join the "
                        "labels back by their own keys), none (only the text and --id-column) or a comma list")
    parser.add_argument("--sections", default="impression,findings",
                        help="comma-separated sections to label, or 'all' for the whole report "
                        "(default: impression,findings)")
    parser.add_argument("--strict-sections", action="store_true",
                        help="label nothing when none of --sections exists (default: fall back to the whole report)")
    parser.add_argument("--evidence", action="store_true", help="add an 'evidence' JSON column (spans + cues)")
    parser.add_argument("--write-sections", action="store_true", help="add section_<key> columns for --sections")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--parallel", choices=("pool", "spacy"), default="pool",
                        help="with --workers > 1: 'pool' = batches of reports per worker, only labels travel back "
                        "(default, scales); 'spacy' = nlp.pipe(n_process=N) (docs travel back as bytes)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="rows read/written per chunk")
    parser.add_argument("--batch-size", type=int, default=256, help="nlp.pipe batch size")
    parser.add_argument("--observations", help="custom observation vocabulary YAML")
    parser.add_argument("--cues", help="custom negation/uncertainty cue YAML")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in CSV_SUFFIXES + PARQUET_SUFFIXES + JSONL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


# ---------------------------------------------------------------------------------------------------------- readers
def _kept_columns(path: Path, available: list[str], wanted: str, id_column: str | None, keep: list[str] | None
                  ) -> list[str]:
    """Input columns to read and pass through, in input order: ``keep`` (None = all) plus the text and id columns."""
    if keep is not None:
        unknown = [c for c in keep if c not in available]
        if unknown:
            raise InputError(f"{path}: --keep-columns: column {unknown[0]!r} not found (columns: "
                             f"{', '.join(available[:20])})")
    chosen = [c for c in available if keep is None or c in keep or c in (wanted, id_column)]
    return chosen


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_MAX_HEADER_FIELD = 64 << 20  # a headerless file may start with a long report: the csv module's default is 128 kB


def _text_encoding(path: Path, wide_ok: bool = True) -> str:
    """The file's encoding from its byte-order mark (UTF-8 otherwise); UTF-16/32 without a BOM is refused instead of
    being read as UTF-8 text full of NUL bytes (which would label garbage)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.name.lower().endswith(".gz"):
        return "utf-8"
    encoding = next((name for bom, name in _BOMS if head.startswith(bom)), None)
    if encoding in ("utf-16", "utf-32") and not wide_ok:
        raise InputError(f"{path}: {encoding.upper()} encoded; convert it to UTF-8 (e.g. iconv -f {encoding.upper()} "
                         "-t UTF-8)")
    if encoding is None and len(head) >= 16 and head.count(0) > len(head) // 4:
        raise InputError(f"{path}: {head.count(0)} NUL bytes in the first {len(head)}: looks like UTF-16/32 text "
                         "without a byte-order mark; convert it to UTF-8 (e.g. iconv -f UTF-16LE -t UTF-8)")
    return encoding or "utf-8"


def _open_csv(path: Path, text_column: str | None, id_column: str | None, chunk_size: int,
              keep: list[str] | None = None):
    """Return (iterator of chunks, text column name, total rows or None). Detects headerless one-column files."""
    import pandas as pd

    encoding = _text_encoding(path)
    limit = csv.field_size_limit(_MAX_HEADER_FIELD)
    try:
        with open(path, newline="", encoding=encoding, errors="surrogateescape") as f:
            first = next(csv.reader(f), None)
    except csv.Error as exc:
        raise InputError(f"{path}: cannot read the first row as CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)
    if first is None:
        return iter(()), text_column or "report", 0
    wanted = text_column or "report"
    header = [c.strip() for c in first]
    # dtype=object keeps Python strings: pandas' Arrow strings reject the surrogate-escaped bytes of non-UTF-8 rows.
    common = dict(dtype=object, keep_default_na=False, na_filter=False, encoding=encoding,
                  encoding_errors="surrogateescape", chunksize=chunk_size)
    try:
        if wanted in header:
            missing = [c for c in (id_column,) if c and c not in header]
            if missing:
                raise InputError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(header)})")
            columns = _kept_columns(path, header, wanted, id_column, keep)
            reader = pd.read_csv(path, usecols=columns, **common)
        elif text_column is None and len(header) == 1 and id_column is None:
            # CheXpert-labeler style: one unnamed column of reports, no header row.
            reader = pd.read_csv(path, header=None, names=[wanted], **common)
        else:
            raise InputError(f"{path}: text column {wanted!r} not found (columns: {', '.join(header[:20])}); "
                             "use --text-column")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:  # the parser reads ahead: a bad first block fails here
        raise InputError(f"{path}: malformed CSV ({str(exc).splitlines()[0]})") from None
    return (chunk for chunk in reader), wanted, None


def _open_parquet(path: Path, text_column: str | None, id_column: str | None, chunk_size: int,
                  keep: list[str] | None = None):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
        raise InputError(f"{path}: not a readable Parquet file ({exc.__class__.__name__}: {exc})") from exc
    names = parquet.schema_arrow.names
    wanted = text_column or "report"
    for column in (wanted, id_column):
        if column and column not in names:
            raise InputError(f"{path}: column {column!r} not found (columns: {', '.join(names[:20])})")
    columns = _kept_columns(path, names, wanted, id_column, keep)
    chunks = (batch.to_pandas() for batch in parquet.iter_batches(batch_size=chunk_size, columns=columns))
    return chunks, wanted, parquet.metadata.num_rows


def _open_jsonl(path: Path, text_column: str | None, id_column: str | None, chunk_size: int,
                keep: list[str] | None = None):
    import gzip

    import pandas as pd

    wanted = text_column or "report"
    _text_encoding(path, wide_ok=False)  # lines are split on b"\n": only UTF-8 (with or without BOM) can be read
    opener = gzip.open if path.name.lower().endswith(".gz") else open

    def records() -> Iterator[dict]:
        with opener(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
                except ValueError:
                    record = None  # a broken line still yields a (blank) output row
                yield record if isinstance(record, dict) else {wanted: None}

    iterator = records()
    first = next(iterator, None)
    if first is not None:
        for column in (wanted, id_column):
            if column and column not in first:
                keys = ", ".join(list(first)[:20])
                raise InputError(f"{path}: key {column!r} not in the first record (keys: {keys})")

    # the first record's keys (a later record's extra keys are not columns of the output)
    columns = _kept_columns(path, list(first) if first else [wanted], wanted, id_column, keep) if first else [wanted]

    def chunks() -> Iterator[Any]:
        buffer = [first] if first is not None else []
        for record in iterator:
            buffer.append(record)
            if len(buffer) >= chunk_size:
                yield pd.DataFrame({c: [r.get(c) for r in buffer] for c in columns}, dtype=object)
                buffer = []
        if buffer:
            yield pd.DataFrame({c: [r.get(c) for r in buffer] for c in columns}, dtype=object)

    return chunks(), wanted, None


# ---------------------------------------------------------------------------------------------------------- writers
def _printable(value: Any) -> Any:
    """Text safe to write as UTF-8 (undecodable bytes become U+FFFD); other values unchanged or stringified."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", errors="replace")
        return value
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


class _Writer:
    def __init__(self, path: Path):
        from rvl.fileio import OutputBusyError, exclusive_output

        self.path = path
        self._lock = exclusive_output(path.with_name(f".{path.name}.lock"), f"the label output {path}")
        try:
            self._lock.__enter__()  # held until close(): a second `rvl label` to the same output is refused
        except OutputBusyError as exc:
            raise InputError(str(exc)) from None
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed run (we hold the lock)
            stale.unlink(missing_ok=True)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.parquet = _suffix(path) in PARQUET_SUFFIXES
        self.writer = None
        self.file = None
        self.rows = 0

    def write(self, frame) -> None:
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, table.schema)
            else:
                table = table.cast(self.writer.schema)
            self.writer.write_table(table)
        else:
            if self.file is None:
                self.file = open(self.tmp, "w", newline="", encoding="utf-8")
            frame.to_csv(self.file, header=self.file.tell() == 0, index=False)  # once, even after empty chunks
        self.rows += len(frame)

    def close(self, ok: bool) -> None:
        try:
            self._close(ok)
        finally:
            self._lock.__exit__(None, None, None)

    def _close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
        if ok:
            if self.writer is None and self.file is None:
                raise RuntimeError("nothing written")
            from rvl.integrity import write_sidecar

            os.replace(self.tmp, self.path)
            write_sidecar(self.path)  # OUT.sha256 (sha256sum -c format): `rvl verify OUT` checks it
        elif self.tmp.exists():
            self.tmp.unlink()


# ---------------------------------------------------------------------------------------------------------- run
def _import_spacy_without_torch() -> None:
    """Import spaCy in this CLI process without thinc's optional ``import torch`` (~4 s and ~300 MB RSS that the
    rule-based labeler never uses). Only when torch is not loaded yet; the block is lifted right after."""
    if "spacy" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import spacy  # noqa: F401
        import thinc.api  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except InputError as exc:
        print(f"rvl label: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"input file not found: {source}")
    kind = _suffix(source)
    openers = {**{s: _open_csv for s in CSV_SUFFIXES}, **{s: _open_parquet for s in PARQUET_SUFFIXES},
               **{s: _open_jsonl for s in JSONL_SUFFIXES}}
    if kind not in openers:
        raise InputError(f"{source}: unknown input type {kind!r} (use .csv, .parquet or .jsonl)")
    stem = source.name[: -len(kind)] if source.name.lower().endswith(kind) else source.stem
    output = Path(args.output) if args.output else source.with_name(
        f"{stem}.labels{'.parquet' if kind in PARQUET_SUFFIXES else '.csv'}")
    if _suffix(output) not in (".csv",) + PARQUET_SUFFIXES:
        raise InputError(f"{output}: output must end in .csv or .parquet")
    if not output.parent.is_dir():
        raise InputError(f"output directory not found: {output.parent}")
    if args.workers < 1 or args.chunk_size < 1 or args.batch_size < 1:
        raise InputError("--workers, --chunk-size and --batch-size must be >= 1")
    sections = None if args.sections.strip().lower() in ("all", "", "none") else tuple(
        s.strip().lower() for s in args.sections.split(",") if s.strip())
    from .sections import SECTION_KEYS

    for s in sections or ():
        if s not in SECTION_KEYS:
            raise InputError(f"--sections: unknown section {s!r} (choose from {', '.join(SECTION_KEYS)}, or all)")
    for option in ("observations", "cues"):
        if getattr(args, option) and not Path(getattr(args, option)).is_file():
            raise InputError(f"--{option}: file not found: {getattr(args, option)}")

    keep = None if args.keep_columns.strip().lower() == "all" else [] if args.keep_columns.strip().lower() == "none" \
        else [c.strip() for c in args.keep_columns.split(",") if c.strip()]
    chunks, text_column, total = openers[kind](source, args.text_column, args.id_column, args.chunk_size, keep)
    _import_spacy_without_torch()

    from .labeler import build_labeler_pipeline, iter_labels, label_columns
    from .sections import extract_sections

    try:
        nlp = build_labeler_pipeline(args.observations, args.cues)
    except (ValueError, OSError) as exc:
        raise InputError(str(exc)) from exc
    columns = label_columns(nlp)
    pending: collections.deque = collections.deque()

    def texts() -> Iterator[Any]:
        for chunk in chunks:
            pending.append(chunk)
            yield from chunk[text_column].tolist()

    stats: dict = {}
    results = iter_labels(texts(), sections, return_evidence=args.evidence, nlp=nlp, batch_size=args.batch_size,
                          n_process=args.workers, parallel=args.parallel, strict_sections=args.strict_sections,
                          stats=stats)
    writer = _Writer(output)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, unit="report", desc="rvl label", file=sys.stderr, smoothing=0.1)
    started = time.perf_counter()
    ok = False
    try:
        import pandas as pd

        rows: list = []
        evidences: list = []

        def flush() -> None:
            chunk = pending.popleft()
            out = chunk.reset_index(drop=True).copy()
            for name in out.columns:
                if out[name].dtype == object:
                    out[name] = [_printable(v) for v in out[name].tolist()]
            clash = [c for c in out.columns if c in columns]
            if clash:
                raise InputError(f"{source}: input column {clash[0]!r} has the name of a label column; leave it out "
                                 "with --keep-columns")
            labels = pd.DataFrame(rows, columns=columns, dtype="float64")
            out = pd.concat([out, labels], axis=1)
            if args.evidence:
                out["evidence"] = [json.dumps(e, ensure_ascii=False) if e else "" for e in evidences]
            if args.write_sections:
                for key in sections or SECTION_KEYS:
                    out[f"section_{key}"] = [
                        _printable(extract_sections(t).get(key, "")) if isinstance(t, str) else "" for t in
                        out[text_column]]
            writer.write(out)
            if progress is not None:
                progress.update(len(out))
            rows.clear()
            evidences.clear()

        for row, evidence in results:
            while pending and len(pending[0]) == len(rows):  # zero-length chunks
                flush()
            rows.append(row)
            evidences.append(evidence)
            if len(rows) == len(pending[0]):
                flush()
        while pending:
            flush()
        if writer.rows == 0:  # empty input: still write a header-only file
            import pandas as pd

            writer.write(pd.DataFrame(columns=[c for c in (args.id_column, text_column) if c] + columns))
        ok = True
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: cannot decode ({exc})") from exc
    except Exception as exc:
        import pandas as pd

        if isinstance(exc, (pd.errors.ParserError, json.JSONDecodeError)):
            raise InputError(f"{source}: malformed input ({str(exc).splitlines()[0]})") from exc
        raise
    finally:
        if progress is not None:
            progress.close()
        writer.close(ok)
    seconds = time.perf_counter() - started
    invalid = {k: v for k, v in stats.items() if k not in ("labelled", "invalid") and v}
    print(f"labelled {writer.rows} reports in {seconds:.1f} s ({writer.rows / max(seconds, 1e-9):.0f} reports/s) "
          f"-> {output}")
    if stats.get("invalid") or invalid:
        print(f"{stats.get('invalid', 0)} invalid reports got all-blank rows; blank rows by reason: {invalid}")
    return 0
