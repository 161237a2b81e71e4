"""``python -m fastpix2pix ...``: the same command as ``fastpix2pix ...``."""

from fastpix2pix.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
