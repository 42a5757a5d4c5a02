import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")
# The tests' networks are tiny and their runs short, so XLA's compilation dominates; its backend
# optimisations buy nothing here (a quarter of the suite's time). XLA:CPU's older loop emitters instead of
# its MLIR fusion emitters, and its LLVM module in one piece (the split compiles in parallel threads that
# the two test processes leave no core for), compile the tiny-network updates in about half the time:
# median of 3 fresh processes, alternating, on the Zen 3 CI-like machine, 2026-11-23: Flow-T 8.84 -> 4.45 s,
# Flow-G 5.14 -> 2.44 s, FlowRL 5.78 -> 4.06 s; the suite 826 -> 633 s. The scripts themselves run with
# XLA's defaults. Subprocesses inherit this. jaxlib 0.11 removed the older emitters and their flag, and XLA
# aborts on a flag it does not know, so that one is given to older jaxlibs only.
_JAXLIB = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1"
                                   + (" --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else ""))
# Most tests compile the same programs again (each run builds its functions anew, and many runs share
# TINY's sizes); JAX's persistent compilation cache, fresh for each session and removed after it, compiles
# each program once. It keys on the program, the flags and the versions, so what runs is unchanged.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
