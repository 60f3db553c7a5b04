"""`python -m infer.generate`: runs `longspec_jax.infer.generate` (see its docstring)."""

import sys

from longspec_jax.infer.generate import main

if __name__ == "__main__":
    sys.exit(main())
