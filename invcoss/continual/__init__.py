"""Continual pre-training across modalities with replay (Stage 2 of Algorithm 1, Eq. 4).

The subsystem, one module per concept, each importing only the ones before it:

- :mod:`.config`: :class:`ContinualConfig` (methods ``seq``, ``er``, ``invcoss``; profiles);
- :mod:`.layout`: the run folder (file names, stage folders, :func:`read_run`);
- :mod:`.replay`: the buffer (schedule, mixup, distillation loss, audited data access);
- :mod:`.train`: one stage's training loop;
- :mod:`.run`: :func:`run_continual`, every stage in order, resumable;
- :mod:`.probe`, :mod:`.plot`, :mod:`.eval`: retention, linear probes, storage, plots;
- :mod:`.experiment`: :func:`run_forgetting_experiment`, the three methods on the same data.
"""

from invcoss.continual.config import METHODS, ContinualConfig, buffer_count
from invcoss.continual.layout import (
    BUFFER_NAME,
    RUN_NAME,
    STAGE_NAME,
    STATS_NAME,
    StageSummary,
    read_run,
    stage_dir,
)
from invcoss.continual.run import ContinualEvent, ContinualResult, run_continual

__all__ = [
    "BUFFER_NAME",
    "METHODS",
    "RUN_NAME",
    "STAGE_NAME",
    "STATS_NAME",
    "ContinualConfig",
    "ContinualEvent",
    "ContinualResult",
    "StageSummary",
    "buffer_count",
    "read_run",
    "run_continual",
    "stage_dir",
]
