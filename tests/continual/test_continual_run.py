"""The continual stage runner: data never read after its stage, buffer sizes, batch mixing, resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from invcoss.continual import run_continual, stage_dir
from invcoss.continual.config import ContinualConfig, buffer_count
from invcoss.continual.replay import load_samples
from invcoss.feature_stats import collect_feature_stats, load_feature_stats
from invcoss.models import MAE, create_model
from invcoss.models.checkpoint import checkpoint_weights_hash
from invcoss.models.weights import weights_hash

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    img_size_2d=32, img_size_3d=(16, 32, 32), epochs=2, batch_size=4, stats_batch_size=8,
    inversion_batch_size=2, inversion_steps=2, inversion_warmup_steps=2,
    inversion_overrides=(("upsample", 1),),  # the quick 3D generator's half size is too small at 32
)  # fmt: skip
SHAPES = {"xray": (3, 32, 32), "pathology": (3, 32, 32), "ct": (1, 16, 32, 32), "mri": (1, 16, 32, 32)}


def tiny_config(method: str, order=("xray", "ct"), **kw) -> ContinualConfig:
    return ContinualConfig.from_profile("quick", method=method, order=order, **{**TINY, **kw})


def tensors(order, n=12, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(n, *SHAPES[m], generator=g) * (2 if m in ("ct", "mri") else 1) for m in order}


class Tripwire(Dataset):
    """Records the stage during which each item is read; a read after its stage fails the test."""

    def __init__(self, data: torch.Tensor, modality: str, clock: dict) -> None:
        self.data, self.modality, self.clock = data, modality, clock
        self.reads: Counter = Counter()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        stage = self.clock["stage"]
        self.reads[stage] += 1
        if self.modality in self.clock["finished"]:
            raise AssertionError(f"{self.modality} data read during stage {stage}, after its own stage")
        return self.data[i]


def test_invcoss_never_opens_an_earlier_stage_after_it(tmp_path):
    order = ("xray", "ct", "pathology")
    clock = {"stage": None, "finished": set()}
    wires = {m: Tripwire(x, m, clock) for m, x in tensors(order).items()}
    opened = []

    def factory(m):
        def open_it():
            opened.append((m, clock["stage"]))
            return wires[m]

        return open_it

    def on_event(e):
        if e.kind == "stage_start":
            clock["stage"] = e.stage
        elif e.kind == "stage_end":
            clock["finished"].add(e.modality)

    config = tiny_config("invcoss", order)
    result = run_continual({m: factory(m) for m in order}, tmp_path, config, device="cpu", on_event=on_event)
    # Each data set was opened once, when its own stage started, and read only during that stage.
    assert opened == [("xray", 0), ("ct", 1), ("pathology", 2)]
    for k, m in enumerate(order):
        assert set(wires[m].reads) == {k} and wires[m].reads[k] > 0
        assert result.stages[k].reads == wires[m].reads[k]  # the runner's own audit agrees
    # Stage 3 replayed both earlier modalities, synthesised from statistics alone.
    third = stage_dir(tmp_path, 2, "pathology")
    for k, m in enumerate(order[:2]):
        samples, meta = load_samples(third / "replay" / f"{m}.safetensors")
        assert meta["kind"] == "synthetic" and meta["stage"] == k
        assert samples.shape == (buffer_count(12, config.buffer_fraction), *SHAPES[m])
        # The quality of every inverted batch is kept with the samples.
        assert sum(q["samples"] for q in meta["quality"]) == samples.shape[0]
        assert all(q["distance"] >= 0 and q["stat_loss"] >= 0 for q in meta["quality"])
    assert result.stages[2].buffer == {"xray": 1, "ct": 1}


def test_buffer_sizes_are_the_requested_fraction(tmp_path):
    data = tensors(("ct", "xray"), n=40)
    for fraction in (0.05, 0.10):
        config = tiny_config("er", ("ct", "xray"), buffer_fraction=fraction, epochs=1)
        run = tmp_path / f"er{fraction}"
        result = run_continual(data, run, config, device="cpu")
        samples, meta = load_samples(stage_dir(run, 0, "ct") / "buffer.safetensors")
        want = round(40 * fraction)
        assert samples.shape[0] == want == result.stages[0].kept == result.stages[1].buffer["ct"]
        # The buffer holds the real samples it names, chosen at random (not the first rows).
        assert torch.equal(samples, data["ct"][meta["indices"]])
        assert meta["indices"] != list(range(want)) and len(set(meta["indices"])) == want
    config = tiny_config("invcoss", ("ct", "xray"), buffer_fraction=0.10, epochs=1)
    result = run_continual(data, tmp_path / "inv", config, device="cpu")
    assert result.stages[1].buffer == {"ct": 4}
    assert not (stage_dir(tmp_path / "inv", 0, "ct") / "buffer.safetensors").exists()


@pytest.mark.parametrize(("interleave", "every"), [("alternate", 1), ("alternate", 2), ("shuffle", 1)])
def test_batches_mix_as_configured(tmp_path, interleave, every):
    steps = []
    config = tiny_config("er", ("xray", "pathology"), interleave=interleave, buffer_every=every, epochs=1)
    config = config.replace(buffer_fraction=0.25)  # 3 of 12 xray samples
    run_continual(
        tensors(("xray", "pathology")),
        tmp_path,
        config,
        device="cpu",
        on_event=lambda e: (
            steps.append((e.stage, e.info["source"], set(e.info["losses"]))) if e.kind == "train" else None
        ),
    )
    first = [s for s in steps if s[0] == 0]
    assert {s[1] for s in first} == {"current"} and len(first) == 3  # no buffer in stage 1
    second = [s for s in steps if s[0] == 1]
    sources = [s[1] for s in second]
    if interleave == "alternate":
        assert sources == (["current"] * every + ["xray"]) * (3 // every) + ["current"] * (3 % every)
    else:
        assert Counter(sources) == {"current": 3, "xray": 1}
    for _, source, losses in second:
        assert losses == ({"mae"} if source == "current" else {"distill", "buffer_mae"})


def test_seq_has_no_buffer_and_stage_outputs_are_complete(tmp_path):
    result = run_continual(tensors(("xray", "ct")), tmp_path, tiny_config("seq"), device="cpu")
    assert [s.buffer for s in result.stages] == [{}, {}]
    for k, m in enumerate(("xray", "ct")):
        folder = stage_dir(tmp_path, k, m)
        keys = set(load_file(str(folder / "model.safetensors")))
        assert {"decoder_pred.2d.weight", "decoder_pred.3d.weight", "mask_token"} <= keys  # decoder kept
        model = MAE.from_pretrained(folder)
        stats = load_feature_stats(folder / "stats.safetensors", model, m)
        assert stats.count == 12 and stats.num_layers == model.config.depth
        assert not (folder / "training_state.safetensors").exists()
        summary = json.loads((folder / "stage.json").read_text())
        assert summary["done"] and len(summary["history"]) == 2 and summary["samples"] == 12
    with safe_open(str(stage_dir(tmp_path, 1, "ct") / "stats.safetensors"), "pt") as f:
        assert f.metadata()["modality"] == "ct"


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    order = ("xray", "pathology")
    data = tensors(order)
    config = tiny_config("er", order, epochs=3)
    run_continual(data, tmp_path / "straight", config, device="cpu")

    def stop_in_stage_two(e):
        if e.kind == "train" and e.stage == 1 and e.info["epoch"] == 2 and e.info["step"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_continual(data, tmp_path / "cut", config, device="cpu", on_event=stop_in_stage_two)
    assert (stage_dir(tmp_path / "cut", 1, "pathology") / "training_state.safetensors").exists()
    # Resuming needs no data for the finished stage: it is not opened again.
    result = run_continual(
        {"pathology": data["pathology"]}, tmp_path / "cut", config, resume=True, device="cpu"
    )
    assert [s.epochs_run for s in result.stages] == [0, 2]
    a = load_file(str(stage_dir(tmp_path / "straight", 1, "pathology") / "model.safetensors"))
    b = load_file(str(stage_dir(tmp_path / "cut", 1, "pathology") / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # Everything done: a resumed run does nothing more.
    again = run_continual({}, tmp_path / "cut", config, resume=True, device="cpu")
    assert [s.epochs_run for s in again.stages] == [0, 0]


def test_user_errors(tmp_path):
    data = tensors(("xray", "ct"))
    config = tiny_config("seq", epochs=1)
    with pytest.raises(ValueError, match="no data given for stage"):
        run_continual({"xray": data["xray"]}, tmp_path / "a", config, device="cpu")
    with pytest.raises(ValueError, match="gives samples of shape"):
        run_continual(
            {"xray": torch.rand(4, 3, 16, 16), "ct": data["ct"]}, tmp_path / "b", config, device="cpu"
        )
    run_continual(data, tmp_path / "c", config, device="cpu")
    with pytest.raises(ValueError, match="already holds a continual run"):
        run_continual(data, tmp_path / "c", config, device="cpu")
    with pytest.raises(ValueError, match="configuration differs .*epochs: run 1, now 2"):
        run_continual(data, tmp_path / "c", config.replace(epochs=2), resume=True, device="cpu")
    with pytest.raises(TypeError, match="data for xray must be"):
        run_continual({"xray": [1, 2], "ct": data["ct"]}, tmp_path / "d", config, device="cpu")


def test_replay_statistics_are_bound_to_their_stage_checkpoint(tmp_path):
    """Stage 1 inverts the stage 0 model with stage 0's statistics; statistics of any other weights
    put in their place are refused, naming both hashes."""
    order = ("ct", "xray")
    data = tensors(order)
    config = tiny_config("invcoss", order, epochs=1)
    run_continual(data, tmp_path, config, device="cpu")
    first, second = stage_dir(tmp_path, 0, "ct"), stage_dir(tmp_path, 1, "xray")
    recorded = load_feature_stats(first / "stats.safetensors").weights_hash
    assert recorded == checkpoint_weights_hash(first) != checkpoint_weights_hash(second)
    # Statistics of the same architecture with other weights, as if the file had been swapped.
    torch.manual_seed(5)
    other = create_model(config.preset, **config.model_overrides())
    collect_feature_stats(other, data["ct"], modality="ct", out=first / "stats.safetensors")
    (second / "stage.json").unlink()  # stage 1 runs again on resume, with its replay made anew
    shutil.rmtree(second / "replay")
    with pytest.raises(
        ValueError,
        match=f"collected with weights {weights_hash(other)[:16]}, but the model's weights are {recorded[:16]}",
    ):
        run_continual(data, tmp_path, config, resume=True, device="cpu")
