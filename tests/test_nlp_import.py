"""`import rvl.nlp` (and building/running the labeler, and `rvl label --help`) stays light."""
from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("open_clip", "transformers", "accelerate", "faiss", "datasets")


def test_import_isolation():
    code = (
        "import sys\n"
        "import rvl.nlp\n"
        "from rvl.nlp import extract_sections, label_reports\n"
        "import rvl.nlp.cli, rvl.nlp.labeler, rvl.nlp.context, rvl.nlp.mentions, rvl.nlp.aggregate\n"
        "assert label_reports(['No pneumothorax.'])['Pneumothorax'].iloc[0] == 0.0\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_plain_import_does_not_load_spacy():
    code = "import sys, rvl.nlp; rvl.nlp.extract_sections('FINDINGS: x'); print('spacy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_label_cli_does_not_load_torch(tmp_path):
    source = tmp_path / "r.csv"
    source.write_text("report\nNo effusion.\n")
    code = ("import sys\nfrom rvl.cli import main\n"
            f"assert main(['label', {str(source)!r}, '--no-progress']) == 0\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'datasets') if sys.modules.get(m)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
