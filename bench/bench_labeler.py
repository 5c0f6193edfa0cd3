"""Throughput and memory of the rvl.nlp labeler.

    .venv/bin/python bench/bench_labeler.py [--quick] [--reports 20000] [--rss-reports 200000] [--workers 1]

1. Throughput (one process = one core) on N varied template reports (MIMIC-CXR / IU X-ray / CheXpert styles, generated
   here with a fixed seed), next to spaCy's bare tokenizer (``spacy.blank("en").tokenizer.pipe``) and the CheXpert
   labeler's published ~3 reports/s, in the same run.
2. Peak RSS of ``rvl label`` on a CSV of M reports, measured in a subprocess (``resource.getrusage(RUSAGE_CHILDREN)``;
   also ``/usr/bin/time -v`` when installed).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ["left", "right", "bilateral", "right basilar", "left basilar", "left lower lobe", "right upper lobe",
         "right middle lobe", "retrocardiac", "perihilar", "bibasilar"]
SIZES = ["small", "moderate", "large", "trace", "mild", "minimal", "tiny"]
CHANGE = ["unchanged", "new", "improved", "worsened", "stable", "slightly increased", "decreased", "similar"]
POSITIVE = [
    "{size} {side} pleural effusion", "{size} cardiomegaly", "{side} atelectasis", "{side} opacity",
    "{size} pulmonary edema", "{side} consolidation", "{side} pneumonia", "{size} {side} pneumothorax",
    "a {n} cm nodule in the {side} lung", "{side} airspace disease", "mild pulmonary vascular congestion",
    "healed {side} rib fractures", "{side} pleural thickening", "enlarged cardiomediastinal silhouette",
    "bibasilar linear scarring", "hyperinflated lungs consistent with emphysema", "a calcified granuloma",
]
NEGATED = ["pneumothorax", "pleural effusion", "focal consolidation", "pulmonary edema", "pneumonia",
           "acute osseous abnormality", "free air under the diaphragm", "large effusion", "lobar collapse"]
HEDGED = ["{side} pneumonia", "a small {side} effusion", "atelectasis", "early consolidation", "mild edema",
          "a {side} nodule", "a tiny apical pneumothorax"]
DEVICES = ["Endotracheal tube terminates {n} cm above the carina.", "Nasogastric tube courses below the diaphragm.",
           "Right internal jugular central venous catheter tip in the SVC.", "Left PICC tip in the low SVC.",
           "Left chest wall pacemaker with leads in the right atrium and ventricle.", "Median sternotomy wires intact.",
           "Right chest tube in place.", "The endotracheal tube has been removed."]


def _sentence(rng: random.Random) -> str:
    fill = dict(size=rng.choice(SIZES), side=rng.choice(SIDES), n=rng.randint(1, 6))
    kind = rng.random()
    if kind < 0.30:
        items = rng.sample(NEGATED, rng.randint(1, 3))
        return rng.choice(["No {}.", "There is no {}.", "No evidence of {}.", "{} is not seen."]).format(
            ", ".join(items[:-1]) + (" or " if len(items) > 1 else "") + items[-1]).capitalize()
    if kind < 0.55:
        finding = rng.choice(POSITIVE).format(**fill)
        return rng.choice(["{f}.", "There is {f}.", "{f}, {c} from prior.", "{c} {f}.", "Interval {c} {f}."]).format(
            f=finding, c=rng.choice(CHANGE)).capitalize()
    if kind < 0.72:
        finding = rng.choice(HEDGED).format(**fill)
        return rng.choice(["Possible {f}.", "Cannot exclude {f}.", "Findings may represent {f}.",
                           "{o} which could reflect {f}.", "Atelectasis versus {f}.", "Likely {f}.",
                           "{f} is not excluded.", "No new {f}."]).format(
            f=finding, o=f"{fill['side'].capitalize()} opacity").capitalize()
    if kind < 0.85:
        return rng.choice(DEVICES).format(**fill)
    return rng.choice(["Heart size is normal.", "The cardiomediastinal silhouette is stable.", "The lungs are clear.",
                       "Heart size is top normal.", "Normal mediastinal contours.", "Lung volumes are low.",
                       "Degenerative changes of the thoracic spine.", "No significant interval change."])


def make_reports(n: int, seed: int = 0) -> list[str]:
    """Varied realistic report texts (MIMIC-CXR, IU X-ray and CheXpert layouts) -- fixed seed."""
    rng = random.Random(seed)
    reports = []
    for i in range(n):
        findings = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7)))
        impression = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        style = i % 4
        if style == 0:  # MIMIC-CXR
            reports.append(f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n "
                           f"INDICATION:  ___ year old {rng.choice(['man', 'woman'])} with "
                           f"{rng.choice(['cough', 'fever', 'dyspnea', 'chest pain'])}, r/o pneumonia.\n \n "
                           f"COMPARISON:  ___\n \n FINDINGS: \n \n {findings}\n \n IMPRESSION: \n \n {impression}")
        elif style == 1:  # IU X-ray
            reports.append(f"Comparison: XXXX.\nIndication: XXXX-year-old with XXXX.\nFindings: {findings}\n"
                           f"Impression: {impression}")
        elif style == 2:  # CheXpert: numbered impression only
            items = [_sentence(rng) for _ in range(rng.randint(1, 4))]
            reports.append("\n".join(f"{k}. {s}" for k, s in enumerate(items, 1)))
        else:  # no headers, two paragraphs
            reports.append(f"{findings}\n\n{impression}")
    return reports


def throughput(reports: list[str], workers: int) -> None:
    import spacy

    from rvl.nlp import build_labeler_pipeline, label_reports
    from rvl.nlp.labeler import clean_for_labelling
    from rvl.nlp.sections import select_text

    n = len(reports)

    def timed(fn) -> tuple[float, float]:
        """(reports per CPU-second of this process = per core, reports per wall second)."""
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)

    tokenizer = spacy.blank("en").tokenizer
    tokens = sum(len(doc) for doc in tokenizer.pipe(reports[:1000])) * n / min(n, 1000)
    nlp = build_labeler_pipeline()
    label_reports(reports[:200], nlp=nlp)  # warm-up
    rows = [("spaCy blank('en') tokenizer only (full text)",
             timed(lambda: sum(1 for _ in tokenizer.pipe(reports, batch_size=256)))),
            ("section extraction + cleaning (regex)",
             timed(lambda: [clean_for_labelling(select_text(r, ("impression", "findings"))) for r in reports])),
            ("rvl label_reports, 1 process (sections+tokenizer+sentences+mentions+ConText+aggregation)",
             timed(lambda: label_reports(reports, nlp=nlp)))]
    if workers > 1:
        start = time.perf_counter()
        label_reports(reports, nlp=nlp, n_process=workers)
        rate = n / (time.perf_counter() - start)
        rows.append((f"rvl label_reports, n_process={workers} (wall only)", (math.nan, rate)))
    frame = label_reports(reports[:2000], nlp=nlp)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"\nThroughput on {n:,} generated reports ({tokens / n:.0f} tokens/report), {os.cpu_count()} cores visible, "
          f"load average {load:.1f} (per-core = reports per CPU-second of the process; wall is lower on a busy box)")
    print(f"{'stage':88s} {'per core/s':>10s} {'wall/s':>8s} {'vs tokenizer':>12s}")
    for name, (cpu_rate, wall_rate) in rows:
        ratio = cpu_rate / rows[0][1][0] if not math.isnan(cpu_rate) else wall_rate / rows[0][1][1]
        print(f"{name:88s} {cpu_rate:10,.0f} {wall_rate:8,.0f} {ratio:12.3f}")
    print(f"{'CheXpert labeler (published: NegBio + BLLIP parse, ~3 reports/s; MIT-LCP/mimic-cxr#7)':88s} "
          f"{3:10,.0f} {3:8,.0f} {3 / rows[0][1][0]:12.5f}")
    per_core = rows[2][1][0]
    print(f"labeler per core: {per_core:,.0f} reports/s (target >= 1,000: {'met' if per_core >= 1000 else 'NOT met'}); "
          f"{per_core / 3:,.0f}x the CheXpert labeler; labels in {int(frame.notna().any(axis=1).sum())}/2000 reports")


def peak_rss(n: int, workers: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rvl-bench-label-"))
    try:
        path = tmp / "reports.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["study_id", "report"])
            for start in range(0, n, 20_000):
                for i, report in enumerate(make_reports(min(20_000, n - start), seed=start)):
                    writer.writerow([start + i, report])
        rvl = Path(sys.executable).with_name("rvl")
        command = [str(rvl) if rvl.exists() else sys.executable, *([] if rvl.exists() else ["-m", "rvl"]), "label",
                   str(path), "--id-column", "study_id", "--output", str(tmp / "labels.parquet"), "--no-progress",
                   "--workers", str(workers)]
        time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
        # A fresh parent process, so that RUSAGE_CHILDREN sees only `rvl label` (this process may have forked
        # big workers earlier).
        probe = ("import resource, subprocess, sys\n"
                 "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                 "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
                 "print('RUSAGE_MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
                 "sys.exit(r.returncode)")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", probe] + ([time_bin, "-v"] if time_bin else []) + command,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
        after = int([ln for ln in result.stdout.splitlines() if ln.startswith("RUSAGE_MAXRSS_KB")][-1].split()[1])
        result.stdout = "\n".join(ln for ln in result.stdout.splitlines() if not ln.startswith("RUSAGE_MAXRSS_KB"))
        if result.returncode != 0:
            print(result.stdout, result.stderr)
            raise SystemExit(f"rvl label failed with exit code {result.returncode}")
        import pyarrow.parquet as pq

        rows_out = pq.ParquetFile(tmp / "labels.parquet").metadata.num_rows
        peak_mb = after / 1024
        line = [ln for ln in result.stderr.splitlines() if "Maximum resident set size" in ln]
        print(f"\nPeak RSS of `rvl label` on {n:,} reports ({path.stat().st_size / 2**20:.0f} MB CSV, "
              f"--workers {workers}): {peak_mb:,.0f} MB (getrusage, largest child)"
              + (f"; /usr/bin/time -v: {int(line[0].split(':')[1]) / 1024:,.0f} MB" if line else "")
              + f"; {seconds:.0f} s wall ({n / seconds:,.0f} reports/s incl. start-up and I/O); "
              f"output rows {rows_out:,} (== input: {rows_out == n}); target <= 1,024 MB: "
              f"{'met' if peak_mb <= 1024 else 'NOT met'}")
        print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 reports for throughput, 20,000 for RSS")
    parser.add_argument("--reports", type=int, default=20_000, help="0 skips the throughput benchmark")
    parser.add_argument("--rss-reports", type=int, default=200_000, help="0 skips the memory benchmark")
    parser.add_argument("--workers", type=int, default=1, help="also time nlp.pipe(n_process=N) when > 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.reports, args.rss_reports = 5_000, 20_000
    if args.reports:
        throughput(make_reports(args.reports), args.workers)
    if args.rss_reports:
        peak_rss(args.rss_reports, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
