"""``python -m rvl`` (and ``accelerate launch -m rvl pretrain ...``) entry point."""
from rvl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
