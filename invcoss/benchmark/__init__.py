"""The benchmark harness: side-by-side throughput of the eager reference, torch.compile and every backend.

One table of specs (:data:`FAMILIES`, in :mod:`~invcoss.benchmark.specs`) says, per op family, how
to make the inputs, the eager torch reference, the fused callable of each backend and the minimum
bytes and flops one call must move; the inversion step is a family of its own
(:mod:`~invcoss.benchmark.inversion`). Everything else is shared by every user:

- :mod:`~invcoss.benchmark.specs`: :class:`Case`, :func:`make_inputs`, :func:`build`, :func:`work`,
  and the agreement check of a provider against the reference (:func:`assert_agrees`);
- :mod:`~invcoss.benchmark.timing`: wall clock, CUDA events after an L2 flush, round-robin, roofs;
- :mod:`~invcoss.benchmark.suite`: :class:`Row`, the case lists, :func:`run_suite`, ratios;
- :mod:`~invcoss.benchmark.tables`: Markdown;
- :mod:`~invcoss.benchmark.guard`: the CPU throughput guard (``benchmarks/cpu_ratios.py``).

Users: the pytest-benchmark suites (``benchmarks/``), ``invcoss-cli bench``, the guard, the
inversion-step script and the GPU check (:mod:`~invcoss.benchmark.check`, with ``records``,
``report`` and ``pytest_records``).
"""

from invcoss.benchmark.inversion import (
    INVERSION,
    INVERSION_PROFILES,
    PLAIN_STEP,
    InversionFamily,
    InversionProfile,
    StepVariant,
    inversion_profiles_for,
    inversion_setup,
    mean_steps_per_batch,
    step_flops,
    step_variants,
    time_inversion,
)
from invcoss.benchmark.providers import REFERENCE_PROVIDERS, kernel_backends, providers_for
from invcoss.benchmark.specs import (
    AGREEMENT,
    FAMILIES,
    MODES,
    OPS,
    Case,
    Op,
    OpFamily,
    assert_agrees,
    build,
    make_inputs,
    relative_error,
    tiny_cases,
    work,
)
from invcoss.benchmark.suite import (
    Row,
    add_ratios,
    cases_for,
    cpu_cases,
    gpu_cases,
    make_row,
    measure_rows,
    rows_to_dicts,
    run_suite,
)
from invcoss.benchmark.tables import inversion_markdown, to_markdown
from invcoss.benchmark.timing import (
    L2_FLUSH_BYTES,
    copy_roof,
    matmul_roof,
    measure_peaks,
    time_calls,
    time_cuda,
    time_fn,
    time_round_robin,
)

__all__ = [
    "AGREEMENT",
    "FAMILIES",
    "INVERSION",
    "INVERSION_PROFILES",
    "L2_FLUSH_BYTES",
    "MODES",
    "OPS",
    "REFERENCE_PROVIDERS",
    "Case",
    "InversionFamily",
    "InversionProfile",
    "Op",
    "OpFamily",
    "PLAIN_STEP",
    "Row",
    "StepVariant",
    "add_ratios",
    "assert_agrees",
    "build",
    "cases_for",
    "copy_roof",
    "cpu_cases",
    "gpu_cases",
    "inversion_markdown",
    "inversion_profiles_for",
    "inversion_setup",
    "mean_steps_per_batch",
    "kernel_backends",
    "make_inputs",
    "make_row",
    "matmul_roof",
    "measure_peaks",
    "measure_rows",
    "providers_for",
    "relative_error",
    "rows_to_dicts",
    "run_suite",
    "time_calls",
    "time_cuda",
    "time_fn",
    "step_flops",
    "step_variants",
    "time_inversion",
    "time_round_robin",
    "tiny_cases",
    "to_markdown",
    "work",
]
