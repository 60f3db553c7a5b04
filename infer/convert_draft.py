"""`python -m infer.convert_draft`: runs `longspec_jax.infer.convert_draft` (see its docstring)."""

import sys

from longspec_jax.infer.convert_draft import main

if __name__ == "__main__":
    sys.exit(main())
