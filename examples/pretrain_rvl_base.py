"""Pretrain rvl-base (ViT-B/16 224 px + a BERT-base-size text tower) on your prepared cache, on one GPU or several.

    # one GPU
    python examples/pretrain_rvl_base.py data/mimic-cache runs/rvl-base
    # all GPUs of this machine (DDP), e.g. 8
    python examples/pretrain_rvl_base.py data/mimic-cache runs/rvl-base --gpus 8
    # several machines: run the printed command on every node with its --machine_rank (see examples/accelerate/)

The script only builds and runs an `accelerate launch ... -m rvl pretrain` command (printed first, so you can copy it
into a cluster job file). The Accelerate configs live in examples/accelerate/; the batch size is per GPU and the
contrastive negatives are gathered across all GPUs, so 8 GPUs x 128 gives 1,024 negatives per step.
Kill it at any time and re-run with --resume: training continues from the last checkpoint mid-epoch.
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ACCELERATE_DIR = Path(__file__).parent / "accelerate"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("data", help="prepared cache (rvl prepare ... --size 224) or a manifest")
parser.add_argument("output_dir")
parser.add_argument("--gpus", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
parser.add_argument("--max-steps", type=int, default=100_000)
parser.add_argument("--accelerate-config", help="override the config picked from examples/accelerate/")
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

configs = sorted(ACCELERATE_DIR.glob("*.yaml"))
if args.accelerate_config:
    config = Path(args.accelerate_config)
else:
    # "1gpu"/"single" for one GPU, "multi_gpu"/"ddp" for several; see examples/accelerate/README for FSDP/multi-node
    wanted = ("single", "1gpu", "one") if args.gpus == 1 else ("multi", "ddp")
    matches = [c for c in configs if any(w in c.stem.lower() for w in wanted)]
    if not matches:
        sys.exit(f"no accelerate config for {args.gpus} GPU(s) in {ACCELERATE_DIR}: "
                 f"{[c.name for c in configs]}; pass --accelerate-config")
    config = matches[0]

cmd = ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(args.gpus),
       "-m", "rvl", "pretrain",
       "--model", "rvl-base",            # Bio_ClinicalBERT text tower when the hub is reachable, else built locally
       "--data", args.data, "--output-dir", args.output_dir,
       "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps),
       "--mixed-precision", "bf16",      # bf16 autocast on Ampere/Hopper; use "no" on older cards
       "--save-every", "2000", "--eval-every", "2000"]
if args.resume:
    cmd.append("--resume")
print(shlex.join(cmd), flush=True)
sys.exit(subprocess.call(cmd))
# The exported model lands in OUTPUT_DIR/model: rvl.model.from_pretrained(...) or, for the towers alone,
# open_clip.create_model_from_pretrained("local-dir:OUTPUT_DIR/model").
