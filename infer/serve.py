"""`python -m infer.serve`: runs `longspec_jax.infer.serve` (see its docstring)."""

import sys

from longspec_jax.infer.serve import main

if __name__ == "__main__":
    sys.exit(main())
