"""``python -m unitscale_jax.train [flags]``: same as ``unitscale-jax train [flags]``."""

import sys

from unitscale_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="python -m unitscale_jax.train"))
