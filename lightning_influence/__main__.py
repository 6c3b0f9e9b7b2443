"""``python -m lightning_influence``: the same command line as ``lightning-influence``."""

from lightning_influence.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
