"""`python -m train.run`: runs `longspec_jax.train.run` (see its docstring)."""

import sys

from longspec_jax.train.run import main

if __name__ == "__main__":
    sys.exit(main())
