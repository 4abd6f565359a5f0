"""One inversion run shared by the ranks of a ``torchrun`` launch (the run itself: :mod:`.run`).

Who does what: the batches are planned as for one process (:func:`~invcoss.inversion.engine.plan_batches`);
the batches that share a generator (``generator_every`` consecutive ones, one for ``pixels``) form a
group, and the groups are dealt to the ranks round robin (:func:`shard_batches`). Every seed of a
batch (its latents, masks, noise and its group's generator initialisation) derives from the run's
seed and the batch's global index, so it does not depend on the number of ranks, and a rank carries
its generator over exactly the batches one process would carry it over. A rank with no group (fewer
groups than ranks) only takes part in the exchanges.

Rounds: the ranks advance in lock step. In round ``t`` every rank inverts its ``t``-th batch and
writes its samples; then the ranks all-gather the batch's ``embed`` features and push them into
their repulsive pools one batch at a time in global batch order (:func:`exchange_features`), so
every rank's pool holds the same features in the same order, bit for bit: the repulsion acts across
ranks, and the samples are a function of the seed and the number of ranks. (Within one round the
batches do not repel each other; a batch sees the pool of the rounds before it.)

Files, beside the single-process layout of :mod:`.files`: samples are named by their global index,
as one process names them, so they are unique across ranks. Rank 0 alone writes ``manifest.json``.
Each rank records its finished rounds in ``ranks/rank_RRRRR.json`` (:func:`progress_path`: the
batch records the manifest will hold, and its state files) and what its next batch needs in
``state/rank_RRRRR_round_TTTTT.safetensors`` (its generator, Adam moments and the pool), keeping the
last two. At the end the ranks gather their records, and rank 0 merges them into the manifest (in
global batch order, each batch with its ``rank``), writes the preview and the quality report and
removes ``ranks/`` and ``state/``.

In memory (:func:`generate_shared`, the continual stages' synthetic buffer): the same rounds and
exchanges without files; at the end every rank holds every batch, in global order.

Resume: a rank records a round only after that round's exchange, so the ranks' recorded rounds
differ by at most one. :func:`agree_on_start` continues every rank after the last round that all of
them recorded (a rank one round ahead redoes it from the state it kept, with the same bits). A kill
of any rank loses at most the round in progress; the run resumes with the same number of ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from invcoss import distributed
from invcoss.data.atomic import atomic_write_json
from invcoss.inversion.batches import BatchResult, GenerateResult, StepInfo
from invcoss.inversion.engine import InversionEngine

__all__ = [
    "RANKS_DIR",
    "agree_on_start",
    "exchange_features",
    "generate_shared",
    "invert_own_batch",
    "progress_path",
    "read_progress",
    "remove_rank_files",
    "round_batches",
    "shard_batches",
    "state_name",
    "write_progress",
]

RANKS_DIR = "ranks"


def shard_batches(num_batches: int, group: int, world: int) -> list[list[int]]:
    """The global batch indices each of ``world`` ranks inverts, in the order it inverts them.

    Groups of ``group`` consecutive batches (one generator each) are dealt round robin: rank ``r``
    takes groups ``r, r + world, ...``. Every batch belongs to exactly one rank.

    Raises:
        ValueError: ``num_batches`` below 0, ``group`` or ``world`` below 1.

    Example:
        >>> shard_batches(5, 1, 2), shard_batches(7, 2, 2), shard_batches(2, 10, 3)
        ([[0, 2, 4], [1, 3]], [[0, 1, 4, 5], [2, 3, 6]], [[0, 1], [], []])
    """
    if num_batches < 0:
        raise ValueError(f"shard_batches expects num_batches >= 0, got {num_batches}")
    for name, value in (("group", group), ("world", world)):
        if value < 1:
            raise ValueError(f"shard_batches expects {name} >= 1, got {value}")
    starts = range(0, num_batches, group)
    return [
        [b for g in starts[r::world] for b in range(g, min(g + group, num_batches))] for r in range(world)
    ]


def round_batches(shards: list[list[int]], t: int) -> list[int | None]:
    """The batch every rank inverts in round ``t`` (None: the rank sits the round out).

    Example:
        >>> round_batches([[0, 2, 4], [1, 3]], 2)
        [4, None]
    """
    return [s[t] if t < len(s) else None for s in shards]


def invert_own_batch(
    inv: InversionEngine, batch: int, sizes: list[int], on_step: Callable[[StepInfo], None] | None
) -> BatchResult:
    """Invert this rank's ``batch`` of a round and leave ``inv.pool`` as before the round: the
    round's features enter every rank's pool together (:func:`exchange_features`)."""
    pool = copy.deepcopy(inv.pool)
    result = inv.invert_batch(batch, sizes[batch], len(sizes), on_step)
    inv.pool = pool
    return result


def exchange_features(inv: InversionEngine, batches: list[int | None], features: torch.Tensor | None) -> None:
    """All-gather one round's ``embed`` features and push them into ``inv.pool`` in global batch order.

    Args:
        inv: the rank's engine; its pool must be as before the round (the caller undoes the push of
            :meth:`~invcoss.inversion.engine.InversionEngine.invert_batch`).
        batches: :func:`round_batches` of the round.
        features: this rank's ``(B, D)`` features of the round, None when it sat out.

    Each batch is one push, as in a single process, so the pool's push count (which times the
    exact rebuilds of its Gram matrix) is the number of batches either way.
    """
    if features is None:
        features = torch.zeros(0, inv.model.config.embed_dim)
    parts = distributed.all_gather_tensors(features.detach().float().cpu().contiguous())
    for _, q in sorted((b, q) for q, b in enumerate(batches) if b is not None):
        inv.pool.push(parts[q].to(inv.device))


def generate_shared(
    inv: InversionEngine, num_samples: int, on_step: Callable[[StepInfo], None] | None = None
) -> GenerateResult:
    """:meth:`~invcoss.inversion.engine.InversionEngine.generate` shared by the ranks of a process group.

    Every rank inverts its own batches (:func:`shard_batches`) in rounds, the ranks exchange each
    round's features (:func:`exchange_features`), and at the end they all-gather the batches, so
    every rank returns the same result: all ``num_samples`` samples in global batch order. With one
    process it is ``inv.generate``. Each batch's seeds depend on its global index only, so without
    repulsion (``alpha_rep=0`` or ``rep`` not among the losses) the samples equal one process's bit for
    bit on a deterministic device; with it, the batches of one round do not repel each other.

    Args:
        inv: this rank's engine, built alike on every rank (same model, statistics and config).
        num_samples: the samples of the whole run (not of this rank).
        on_step: called after every step of this rank's own batches.

    Raises:
        NonFiniteLossError: a loss became non-finite on some rank (raised on every rank).
        DistributedError: another rank died or did not answer within the timeout.
    """
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return inv.generate(num_samples, on_step=on_step)
    inv.start(num_samples)
    sizes = inv.batch_sizes(num_samples)
    group = 1 if inv.config.generator == "pixels" else inv.config.generator_every
    shards = shard_batches(len(sizes), group, world)
    mine = shards[rank]
    done: list[BatchResult] = []
    for t in range(max(len(s) for s in shards)):

        def invert_mine(t: int = t) -> BatchResult | None:
            return invert_own_batch(inv, mine[t], sizes, on_step) if t < len(mine) else None

        result = distributed.on_all(invert_mine)  # a failed batch stops every rank, not only its own
        exchange_features(inv, round_batches(shards, t), None if result is None else result.embeddings)
        if result is not None:
            done.append(result)
    return _gather_batches(inv, done, sizes)


def _gather_batches(inv: InversionEngine, done: list[BatchResult], sizes: list[int]) -> GenerateResult:
    """Every rank's batches ``done`` on every rank, in global batch order (``sizes``: of every batch)."""
    images = torch.zeros((0, *inv.input_shape))  # for a rank that ran nothing: the shape to share
    embeddings = torch.zeros((0, inv.model.config.embed_dim))
    if done:
        images, embeddings = torch.cat([r.images for r in done]), torch.cat([r.embeddings for r in done])
    image_parts = distributed.all_gather_tensors(images.float().contiguous())
    embedding_parts = distributed.all_gather_tensors(embeddings.float().contiguous())
    empty = torch.zeros(0)
    records = distributed.all_gather_object(
        [dataclasses.replace(r, images=empty, embeddings=empty) for r in done]
    )
    batches: list[BatchResult] = []
    for recs, imgs, embs in zip(records, image_parts, embedding_parts):
        start = 0
        for r in recs:
            part = slice(start, start + sizes[r.index])
            batches.append(dataclasses.replace(r, images=imgs[part], embeddings=embs[part]))
            start = part.stop
    batches.sort(key=lambda r: r.index)
    return GenerateResult(
        images=torch.cat([r.images for r in batches]),
        embeddings=torch.cat([r.embeddings for r in batches]),
        batches=batches,
    )


def progress_path(out: Path, rank: int) -> Path:
    """The file of a rank's finished rounds: ``ranks/rank_RRRRR.json``."""
    return out / RANKS_DIR / f"rank_{rank:05d}.json"


def state_name(rank: int, t: int) -> str:
    """A rank's state after round ``t``, relative to the run folder."""
    return f"state/rank_{rank:05d}_round_{t:05d}.safetensors"


def read_progress(out: Path, rank: int) -> dict:
    """The rank's progress record; a rank that finished no round has ``rounds`` 0.

    Raises:
        ValueError: the file exists but cannot be read (named).
    """
    path = progress_path(out, rank)
    if not path.is_file():
        return {"rank": rank, "rounds": 0, "batches": [], "states": []}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def write_progress(out: Path, rank: int, progress: dict) -> None:
    """Write the rank's progress record atomically; then remove its state files it no longer lists."""
    atomic_write_json(progress_path(out, rank), progress)
    keep = {Path(s).name for s in progress["states"]}
    state = out / "state"
    if state.is_dir():
        for p in state.glob(f"rank_{rank:05d}_round_*"):
            if p.name not in keep:
                p.unlink(missing_ok=True)


def agree_on_start(out: Path, progress: dict) -> int:
    """The round every rank continues from: the fewest rounds any rank recorded.

    It is also where the ranks find out whether they share the folder: every rank must see the
    manifest that rank 0 wrote.

    Raises:
        ValueError: some rank does not see ``out/manifest.json`` (naming the ranks).
    """
    seen = distributed.all_gather_object(((out / "manifest.json").is_file(), int(progress["rounds"])))
    blind = [q for q, (ok, _) in enumerate(seen) if not ok]
    if blind:
        ranks = ", ".join(str(q) for q in blind)
        raise ValueError(
            f"rank {ranks} of {len(seen)} cannot see {out / 'manifest.json'}, which rank 0 wrote: every rank "
            "must write into the same --out folder (one machine, or a file system every machine mounts)"
        )
    return min(rounds for _, rounds in seen)


def remove_rank_files(out: Path) -> None:
    """Remove ``ranks/`` and ``state/`` of a merged run."""
    for name in (RANKS_DIR, "state"):
        shutil.rmtree(out / name, ignore_errors=True)
