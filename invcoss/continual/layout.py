"""The folder of a continual run: file names, stage folders, reading a run back.

Run folder ``RUN``::

    continual.json                  the configuration, the stage folders, the compute settings
    stage1_ct/                      one folder per stage, named stage<k>_<modality>
        config.json model.safetensors   the checkpoint (MAE.from_pretrained(folder))
        stats.safetensors           per-block feature statistics of the stage's data
        buffer.safetensors          er: the real samples kept for later stages
        replay/<modality>.safetensors   invcoss: the synthetic samples replayed in this stage
        stage.json                  losses per epoch, buffer sizes, data sizes and reads, timings;
                                    the done flag
        training_state.safetensors  while the stage trains (removed when it is done)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from invcoss.continual.config import ContinualConfig

__all__ = [
    "BUFFER_NAME",
    "REPLAY_DIR",
    "RUN_FORMAT",
    "RUN_NAME",
    "STAGE_NAME",
    "STATS_NAME",
    "StageSummary",
    "read_run",
    "stage_done",
    "stage_dir",
]


RUN_NAME = "continual.json"


STAGE_NAME = "stage.json"


STATS_NAME = "stats.safetensors"


BUFFER_NAME = "buffer.safetensors"


REPLAY_DIR = "replay"


RUN_FORMAT = "invcoss-continual/1"


def stage_dir(run: str | Path, index: int, modality: str) -> Path:
    """The folder of stage ``index`` (0-based): ``RUN/stage<index+1>_<modality>``."""
    return Path(run) / f"stage{index + 1}_{modality}"


@dataclass
class StageSummary:
    """What ``RUN/stage<k>_<modality>/stage.json`` holds (see :func:`run_continual`)."""

    stage: int
    modality: str
    dir: Path
    samples: int
    history: list[dict]
    buffer: dict[str, int]
    kept: int
    reads: int
    seconds: dict[str, float]
    epochs_run: int = 0

    @classmethod
    def read(cls, folder: Path, epochs_run: int = 0) -> StageSummary:
        d = json.loads((folder / STAGE_NAME).read_text())
        return cls(
            stage=d["stage"],
            modality=d["modality"],
            dir=folder,
            samples=d["samples"],
            history=d["history"],
            buffer=d["buffer"],
            kept=d["kept"],
            reads=d["reads"],
            seconds=d["seconds"],
            epochs_run=epochs_run,
        )


def read_run(run: str | Path) -> ContinualConfig:
    """The configuration of a run folder.

    Raises:
        ValueError: not a continual run folder.
    """
    path = Path(run) / RUN_NAME
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run} is not a continual run folder (cannot read {RUN_NAME}: {e})") from None
    if d.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: unknown format {d.get('format')!r}, expected {RUN_FORMAT!r}")
    return ContinualConfig.from_dict(d["config"])


def stage_done(folder: Path) -> bool:
    """Whether the stage in ``folder`` finished (its ``stage.json`` says done)."""
    try:
        return bool(json.loads((folder / STAGE_NAME).read_text()).get("done"))
    except (OSError, ValueError):
        return False
