"""Data-free model inversion (Stage 1 of Algorithm 1): a frozen MAE and its statistics → images.

The subsystem, one module per concept, each importing only the ones before it:

- :mod:`.config`: :class:`InversionConfig`, the paper and quick profiles;
- :mod:`.engine`: :class:`InversionEngine`, the optimisation of generator and latents (Eq. 6);
- :mod:`.files`: the files of a run folder (samples, preview, digests);
- :mod:`.report`: the quality report (statistics, diversity, Fréchet distance);
- :mod:`.run`: :func:`run_inversion` and :class:`Inverter`, the engine that writes resumable runs.
"""

from invcoss.inversion.config import GENERATORS, LOSS_TERMS, PROFILES, InversionConfig
from invcoss.inversion.engine import (
    BatchResult,
    GenerateResult,
    InversionEngine,
    NonFiniteLossError,
    StepInfo,
    derive_seed,
    plan_batches,
)
from invcoss.inversion.run import InversionResult, Inverter, RunFolderError, run_inversion
from invcoss.inversion.step import CompiledStepWarning

__all__ = [
    "GENERATORS",
    "LOSS_TERMS",
    "PROFILES",
    "BatchResult",
    "CompiledStepWarning",
    "GenerateResult",
    "InversionConfig",
    "InversionEngine",
    "InversionResult",
    "Inverter",
    "NonFiniteLossError",
    "RunFolderError",
    "StepInfo",
    "derive_seed",
    "plan_batches",
    "run_inversion",
]
