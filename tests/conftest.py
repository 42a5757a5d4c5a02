import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")
# The tests' networks are tiny and their runs short, so XLA's compilation dominates; its backend
# optimisations buy nothing here (a quarter of the suite's time). Subprocesses inherit this.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
