"""``rvl demo``: the whole pipeline end to end on the built-in phantoms, with an evaluation report.

Stages (each leaves a sealed marker ``DIR/stages/<name>.stage.json`` holding the hash of the settings it ran with, so a
re-run with the same settings reuses it and a changed setting re-runs it and everything after it; a damaged marker
re-runs its stage):

1. ``phantoms``  generate phantom studies (patient-level train/validate/test split)
2. ``label``     label the reports with ``rvl.nlp``; agreement with the phantoms' ground truth
3. ``prepare``   the image cache (all views, and a frontal-only copy for the ablation)
4. ``pretrain``  ``rvl-small`` on all views, then a frontal-only model on the same budget (steps, batch)
5. ``index``     study and report indexes of the archive (``rvl.retrieval``)
6. ``evaluate``  held-out patients: zero-shot AUC (prompt, kNN) with CIs, R@K, pointing game, multi-view gain
7. ``report``    ``DIR/report.html`` (self-contained) and ``DIR/metrics.json``; a summary table on screen
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rvl.integrity import write_sealed_json, write_sidecar

DEFAULT_STUDIES = 2000
DEFAULT_MINUTES = 9.0
STAGES = ["phantoms", "label", "prepare", "pretrain", "index", "evaluate", "report"]
# share of the time budget each stage is expected to take; pretraining gets what the others leave (for the ETA)
STAGE_WEIGHTS = {"phantoms": 0.04, "label": 0.02, "prepare": 0.05, "pretrain": 0.70, "index": 0.04, "evaluate": 0.12,
                 "report": 0.03}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--studies", type=int, default=DEFAULT_STUDIES,
                        help=f"phantom studies to generate (default {DEFAULT_STUDIES})")
    parser.add_argument("--minutes", type=float, default=None,
                        help="size the training steps to fit this time budget for the whole demo instead of the "
                        "recipe's fixed step count (numbers then depend on the machine's speed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training (default 0)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps (default: the recipe's fixed count, sized so that the whole demo takes "
                        "under 10 minutes on 2 CPU cores)")
    parser.add_argument("--force", action="store_true", help="re-run every stage even when a finished one matches")


def run(args: argparse.Namespace) -> int:
    if args.studies < 50:
        print(f"rvl demo: --studies must be at least 50 (got {args.studies})", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print(f"rvl demo: --max-steps must be at least 1 (got {args.max_steps})", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print(f"rvl demo: --minutes must be positive (got {args.minutes})", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("rvl demo: --device cuda asked for but no CUDA device is available", file=sys.stderr)
            return 2
    from rvl.demo.report import summary_table
    from rvl.fileio import OutputBusyError
    from rvl.integrity import IntegrityError

    try:
        metrics = run_demo(Path(args.output), studies=args.studies, minutes=args.minutes, device=args.device,
                           seed=args.seed, max_steps=args.max_steps, force=args.force)
    except (OutputBusyError, IntegrityError) as err:  # a second demo on the folder; an altered artifact
        print(f"rvl demo: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(metrics))
    print(f"\nreport: {Path(args.output) / 'report.html'}\nmetrics: {Path(args.output) / 'metrics.json'}")
    from rvl.serve.cli import demo_serve_command

    print(f"browse the archive: {demo_serve_command(Path(args.output))}")
    return 0


# ------------------------------------------------------------------------------------------------- stage runner
def settings_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class StageRunner:
    """Runs the stages in order, reusing finished ones whose settings hash matches, and prints progress with an ETA."""

    def __init__(self, output: Path, budget_s: float, force: bool = False) -> None:
        self.output = output
        self.marker_dir = output / "stages"
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.budget_s = budget_s
        self.force = force
        self.start = time.time()
        self.current = ""  # settings hash of the stage running now (the pretrain stage resumes only its own runs)
        self.chain = ""  # hash of everything upstream: a changed earlier stage invalidates the later ones
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def eta(self, name: str) -> str:
        elapsed = time.time() - self.start
        left = sum(STAGE_WEIGHTS[s] for s in STAGES[STAGES.index(name):]) * self.budget_s
        return f"elapsed {_fmt_duration(elapsed)}, about {_fmt_duration(left)} left"

    def run(self, name: str, settings: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` (returning a JSON-able result) unless a marker with the same settings hash exists."""
        digest = settings_hash({"stage": name, "settings": settings, "upstream": self.chain})
        self.chain = digest
        self.current = digest
        marker = self.marker_dir / f"{name}.stage.json"  # not "prepare.json": that names a cache
        number = f"[{STAGES.index(name) + 1}/{len(STAGES)}]"
        saved = _read_marker(marker) if marker.is_file() and not self.force else None
        if saved is not None and saved.get("hash") == digest:
            print(f"{number} {name}: reusing the finished stage (settings {digest})", flush=True)
            self.seconds[name] = 0.0
            self.reused.append(name)
            return saved["result"]
        marker.unlink(missing_ok=True)
        print(f"\n{number} {name} — {self.eta(name)}", flush=True)
        t0 = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        # sealed: a damaged marker is never taken for a finished stage (its result would be used as if true)
        write_sealed_json(marker, {"hash": digest, "settings": settings, "seconds": self.seconds[name],
                                   "result": result})
        write_sidecar(marker)
        print(f"{number} {name} done in {self.seconds[name]:.0f} s", flush=True)
        return result


def _remove_temporaries(output: Path) -> None:
    """Remove the hidden temporaries a killed demo left in any of its stages' folders: their writers died with it, and
    this demo holds the folder's lock."""
    from rvl.fileio import remove_temporaries

    found = remove_temporaries(output)
    if found:
        print(f"rvl demo: removed {found} temporary file(s) left by an interrupted run", flush=True)


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """A finished stage's record, or None (the stage runs again) when it is unreadable or its seal does not match."""
    from rvl.integrity import IntegrityError, read_sealed_json

    try:
        return read_sealed_json(marker, "stage record")
    except (OSError, IntegrityError):
        pass
    print(f"rvl demo: the stage record {marker} is damaged (or from an older rvl): running that stage again",
          file=sys.stderr, flush=True)
    return None


# ---------------------------------------------------------------------------------------------------- pipeline
def run_demo(output: Path, studies: int = DEFAULT_STUDIES, minutes: float | None = None, device: str = "auto",
             seed: int = 0, max_steps: int | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo in ``output`` and return the metrics written to ``output/metrics.json``."""
    from rvl.fileio import exclusive_output

    output = Path(output)
    with exclusive_output(output / ".demo.lock", f"the demo folder {output}"):
        return _run_demo_locked(output, studies, minutes, device, seed, max_steps, force)


def _run_demo_locked(output: Path, studies: int, minutes: float | None, device: str, seed: int,
                     max_steps: int | None, force: bool) -> dict[str, Any]:
    from rvl.demo import evaluation as ev
    from rvl.demo import stages as st

    output.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(output)
    t_start = time.time()
    device = st.resolve_device(device)
    recipe = st.load_recipe(device)
    runner = StageRunner(output, budget_s=(minutes or DEFAULT_MINUTES) * 60.0, force=force)
    base = {"studies": studies, "seed": seed, "image_size": recipe["image_size"]}

    phantoms = runner.run("phantoms", base, lambda: st.stage_phantoms(output, studies, seed, recipe))
    labels = runner.run("label", {}, lambda: st.stage_label(output, phantoms))
    prepared = runner.run("prepare", {"size": recipe["image_size"]}, lambda: st.stage_prepare(output, labels, recipe))
    train_settings = {"minutes": minutes, "device": device, "max_steps": max_steps, "recipe": recipe}
    budget_left = minutes * 60.0 - (time.time() - t_start) if minutes else None
    trained = runner.run("pretrain", train_settings,
                         lambda: st.stage_pretrain(output, prepared, recipe, device, seed, budget_left, max_steps,
                                                   run_key=runner.current))
    indexes = runner.run("index", {}, lambda: st.stage_index(output, prepared, trained, device))
    evaluation = runner.run("evaluate", {"recipe": recipe.get("eval", {})},
                            lambda: ev.stage_evaluate(output, phantoms, prepared, trained, indexes, device, recipe))

    def _report() -> dict[str, Any]:
        metrics = ev.assemble_metrics(phantoms, labels, prepared, trained, indexes, evaluation,
                                      settings={"studies": studies, "minutes": minutes, "device": device,
                                                "seed": seed, **{k: v for k, v in recipe.items() if k != "eval"}})
        metrics["stage_seconds"] = {**runner.seconds, "report": 0.0}
        metrics["reused_stages"] = list(runner.reused)
        metrics["runtime_s"] = round(time.time() - t_start, 1)
        ev.stage_report(output, metrics, evaluation, indexes)
        return {"metrics": str(output / "metrics.json")}

    runner.force = True  # the report is cheap and carries this run's timings: always rewrite it
    runner.run("report", {}, _report)
    return json.loads((output / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rvl demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
