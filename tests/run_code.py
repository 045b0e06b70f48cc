"""`python -m tests.run_code CODE`: runs CODE in a fresh interpreter, so a test
can set process-wide JAX options (device count) before JAX starts."""

import sys

if __name__ == "__main__":
  exec(compile(sys.argv[1], "<test code>", "exec"), {"__name__": "__main__"})
