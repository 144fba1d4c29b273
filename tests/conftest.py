"""Settings for the whole test session, read before any test module imports JAX.

XLA's CPU backend compiles at LLVM optimisation level 0 here
(``--xla_backend_optimization_level=0``, put in front of any ``XLA_FLAGS`` already set, so a
flag given on the command line wins). The tests' models are tiny, so compiling dominates
their time: on the 2-core CI machine -O0 cut ``tests/nn/test_decoder.py`` +
``tests/ops/test_attention_window.py`` from 100 s to 62 s. It changes how fast the compiled
code runs, not what it computes: XLA's own HLO passes (fusion, layout) still run, and XLA
does not enable fast-math, so LLVM may not reorder floating-point arithmetic at any level.
Subprocesses the tests start inherit it through the environment. Benchmarks and experiments
do not import this file and compile at the default level.
"""

import os

os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           + os.environ.get("XLA_FLAGS", "")).strip()
