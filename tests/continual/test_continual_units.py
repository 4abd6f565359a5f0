"""Continual building blocks: configuration, buffer sizes, batch schedule, mixup, distillation, audit."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch

from invcoss.continual.config import ContinualConfig, buffer_count
from invcoss.continual.replay import (
    CURRENT,
    AuditedDataset,
    DataAccessError,
    buffer_mixup,
    epoch_schedule,
    feature_distillation_loss,
    flat_patches,
    load_samples,
    replay_loss,
    save_samples,
)
from invcoss.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"img_size_2d": 32, "img_size_3d": (16, 32, 32)}


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (1000, 0.01, 10),
        (1000, 0.05, 50),
        (1000, 0.10, 100),
        (48, 0.10, 5),
        (20, 0.05, 1),
        (3, 0.01, 1),
        (7, 1.0, 7),
    ],
)
def test_buffer_count_is_the_fraction_rounded_and_at_least_one(n, fraction, expected):
    assert buffer_count(n, fraction) == expected


def test_profiles_and_validation():
    paper = ContinualConfig.from_profile("paper")
    assert (paper.preset, paper.epochs, paper.batch_size, paper.lr) == ("vit_base", 300, 512, 1.5e-4)
    assert (paper.buffer_fraction, paper.distill_weight, paper.interleave) == (0.05, 1.0, "shuffle")
    quick = ContinualConfig.from_profile("quick", order=("CT", "path"))
    assert quick.preset == "vit_nano" and quick.order == ("ct", "pathology")
    assert ContinualConfig.from_dict(quick.to_dict()) == quick
    for bad, match in [
        ({"method": "ewc"}, "method must be one of"),
        ({"order": ("ct", "ct")}, "must not repeat"),
        ({"order": ("ct", "pet")}, "unknown modality 'pet'"),
        ({"buffer_fraction": 0.0}, "buffer_fraction must be in"),
        ({"interleave": "random"}, "interleave must be one of"),
        ({"distill_weight": 0.0, "buffer_mae_weight": 0.0}, "needs distill_weight > 0"),
        ({"mixup_alpha": -1.0}, "mixup_alpha must be"),
        ({"inversion_overrides": (("nope", 1),)}, "unknown InversionConfig field"),
    ]:
        with pytest.raises(ValueError, match=match):
            ContinualConfig.from_profile("quick", **bad)
    inv = quick.replace(inversion_steps=7, inversion_overrides=(("losses", ["task", "norm"]),))
    assert ContinualConfig.from_dict(json.loads(json.dumps(inv.to_dict()))) == inv
    made = inv.inversion_config("ct", seed=3)
    assert (made.profile, made.steps, made.losses, made.seed) == ("quick", 7, ("task", "norm"), 3)
    with pytest.raises(TypeError, match="unknown ContinualConfig field"):
        ContinualConfig.from_profile("quick", epoch=3)
    with pytest.raises(ValueError, match="unknown continual profile"):
        ContinualConfig.from_profile("fast")


def test_shuffle_schedule_holds_every_sample_once_in_single_modality_batches():
    g = torch.Generator().manual_seed(3)
    schedule = epoch_schedule(40, {"ct": 7, "mri": 3}, 4, "shuffle", generator=g)
    by_source = {s: [i for b in schedule if b.source == s for i in b.indices] for s in (CURRENT, "ct", "mri")}
    assert sorted(by_source[CURRENT]) == list(range(40))
    assert sorted(by_source["ct"]) == list(range(7)) and sorted(by_source["mri"]) == list(range(3))
    assert Counter(b.source for b in schedule) == {CURRENT: 10, "ct": 2, "mri": 1}
    assert all(len(b.indices) <= 4 for b in schedule)
    # Buffer batches are spread among the current ones, not appended at the end.
    positions = [k for k, b in enumerate(schedule) if b.source != CURRENT]
    assert positions != list(range(len(schedule) - 3, len(schedule)))
    # The ragged current batch is dropped once the data holds two batches (as pretrain does).
    assert Counter(b.source for b in epoch_schedule(10, {}, 4, generator=g)) == {CURRENT: 2}
    assert [len(b.indices) for b in epoch_schedule(5, {}, 4, generator=g)] == [4, 1]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_alternate_schedule_places_one_buffer_batch_after_every_k_current(every):
    g = torch.Generator().manual_seed(0)
    schedule = epoch_schedule(48, {"ct": 5, "mri": 2}, 8, "alternate", buffer_every=every, generator=g)
    pattern = ([CURRENT] * every + ["B"]) * (6 // every)
    assert ["B" if b.source != CURRENT else CURRENT for b in schedule] == pattern
    buffer = [b for b in schedule if b.source != CURRENT]
    assert [b.source for b in buffer] == (["ct", "mri"] * 3)[: len(buffer)]  # modalities in turn
    assert all(len(b.indices) == {"ct": 5, "mri": 2}[b.source] for b in buffer)
    # Each modality cycles through its whole buffer before repeating a sample.
    ct = [i for b in buffer if b.source == "ct" for i in b.indices]
    assert sorted(ct[:5]) == list(range(5))


def test_schedule_is_reproducible_from_its_generator():
    def make(seed):
        return epoch_schedule(30, {"ct": 4}, 4, "shuffle", generator=torch.Generator().manual_seed(seed))

    assert make(1) == make(1) and make(1) != make(2)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interleave must be"):
        epoch_schedule(4, {}, 2, "zip")
    with pytest.raises(ValueError, match="num_current, batch_size and buffer_every"):
        epoch_schedule(0, {}, 2)


def test_mixup_is_a_convex_combination_within_the_batch():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = buffer_mixup(x, 1.0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    assert bool((y >= 0).all() and (y <= 3).all())
    assert torch.equal(buffer_mixup(x, 0.0), x) and torch.equal(buffer_mixup(x[:1], 1.0), x[:1])
    a = buffer_mixup(x, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, buffer_mixup(x, 0.5, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 16, 32, 32)], ids=["2d", "3d"])
def test_distillation_is_zero_for_an_identical_teacher_and_positive_otherwise(shape):
    model = create_model("vit_nano", **SMALL)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    x = torch.rand(shape)
    loss, latent, mask, ids = feature_distillation_loss(model, teacher, x, 0.75)
    assert float(loss.detach()) == 0.0
    assert latent.shape[1] == 1 + int(mask.shape[1] * 0.25) and ids.shape == mask.shape
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.05 * torch.randn_like(model.blocks[0].mlp.fc1.weight))
    loss = feature_distillation_loss(model, teacher, x, 0.75)[0]
    assert float(loss.detach()) > 0
    loss.backward()
    assert model.blocks[0].mlp.fc1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_compares_the_same_visible_tokens():
    model = create_model("vit_nano", **SMALL)
    teacher = copy.deepcopy(model).eval()
    x = torch.rand(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    latent = feature_distillation_loss(model, teacher, x, 0.5, noise)[1]
    torch.testing.assert_close(latent, teacher.forward_encoder(x, 0.5, noise)[0], rtol=0, atol=0)
    # Another mask on the teacher's side would give a non-zero loss: the shared noise matters.
    other = teacher.forward_encoder(x, 0.5, torch.rand(2, 4))[0]
    assert not torch.equal(latent, other)


def test_replay_loss_adds_the_weighted_mae_term():
    torch.manual_seed(1)
    model = create_model("vit_nano", **SMALL)
    teacher = copy.deepcopy(model).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(5)
    total, parts = replay_loss(model, teacher, x, 0.75, distill_weight=1.0, mae_weight=0.5)
    assert parts["distill"] == 0.0
    torch.manual_seed(5)
    mae = model(x, 0.75)[0]  # same global RNG state → same mask
    mae = float(mae.detach())
    assert parts["mae"] == pytest.approx(mae, rel=1e-6)
    assert float(total.detach()) == pytest.approx(0.5 * mae, rel=1e-6)
    assert "mae" not in replay_loss(model, teacher, x, 0.75, 1.0, 0.0)[1]


def test_replay_loss_leaves_flat_patches_out_of_the_mae_term():
    torch.manual_seed(1)
    model = create_model("vit_nano", **SMALL)
    teacher = copy.deepcopy(model).eval()
    x = torch.full((2, 3, 32, 32), 0.5)
    x[:, :, :16] += 0.3 * torch.rand(2, 3, 16, 32)  # top half structured, bottom half flat
    assert flat_patches(model, x, 0.01).tolist() == [[False, False, True, True]] * 2
    torch.manual_seed(5)
    _, parts = replay_loss(model, teacher, x, 0.5, 1.0, 1.0, mae_flat_std=0.01)
    assert parts["flat"] == 0.5
    # The same masks (the first global draw is the mask noise), scored by hand without flat patches.
    torch.manual_seed(5)
    with torch.no_grad():
        latent, mask, ids = model.forward_encoder(x, 0.5, torch.rand(2, 4))
        pred = model.forward_decoder(latent, ids, 2)
    keep = mask * (~flat_patches(model, x, 0.01)).float()
    assert parts["mae"] == pytest.approx(float(model.forward_loss(x, pred, keep)), rel=1e-6)
    assert parts["mae"] != pytest.approx(float(model.forward_loss(x, pred, mask)), rel=1e-3)
    # Flat patches carry none of the loss: all-flat masks score zero.
    all_flat = torch.full((2, 3, 32, 32), 0.5)
    assert replay_loss(model, teacher, all_flat, 0.75, 1.0, 1.0, mae_flat_std=0.01)[1]["mae"] == 0.0
    assert replay_loss(model, teacher, all_flat, 0.75, 1.0, 1.0)[1]["mae"] > 0.0
    with pytest.raises(ValueError, match="max_std must be >= 0"):
        flat_patches(model, x, -1.0)


def test_replay_loss_with_the_teacher_target_matches_the_previous_reconstruction():
    torch.manual_seed(2)
    teacher = create_model("vit_nano", **SMALL).eval()
    x = torch.rand(2, 3, 32, 32)
    # The same model as teacher: its reconstruction is the target, so the term is exactly zero,
    # where the pixel target is not.
    assert (
        replay_loss(copy.deepcopy(teacher), teacher, x, 0.75, 1.0, 1.0, mae_target="teacher")[1]["mae"] == 0.0
    )
    assert replay_loss(copy.deepcopy(teacher), teacher, x, 0.75, 1.0, 1.0)[1]["mae"] > 0.1
    model = create_model("vit_nano", **SMALL)
    torch.manual_seed(5)
    _, parts = replay_loss(model, teacher, x, 0.5, 1.0, 1.0, mae_target="teacher")
    torch.manual_seed(5)
    noise = torch.rand(2, 4)
    with torch.no_grad():
        latent, mask, ids = model.forward_encoder(x, 0.5, noise)
        pred = model.forward_decoder(latent, ids, 2)
        t_latent, t_mask, t_ids = teacher.forward_encoder(x, 0.5, noise)
        target = teacher.forward_decoder(t_latent, t_ids, 2)
    assert torch.equal(mask, t_mask)
    expected = float(((pred - target).pow(2).mean(-1) * mask).sum() / mask.sum())
    assert parts["mae"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="mae_target must be one of pixels, teacher"):
        replay_loss(model, teacher, x, 0.5, 1.0, 1.0, mae_target="decoder")
    with pytest.raises(ValueError, match="buffer_mae_target must be one of pixels, teacher, auto"):
        ContinualConfig.from_profile("quick", buffer_mae_target="decoder")


def test_audited_dataset_counts_reads_and_refuses_them_once_sealed():
    ds = AuditedDataset(torch.arange(6.0).view(6, 1), "mri")
    assert len(ds) == 6 and float(ds[2][0]) == 2.0 and ds.reads == 1
    ds.seal()
    with pytest.raises(DataAccessError, match="mri data of a finished stage was read"):
        ds[0]
    assert ds.reads == 1


def test_samples_file_round_trip(tmp_path):
    x = torch.rand(3, 1, 4, 4)
    save_samples(tmp_path / "b.safetensors", x, {"modality": "ct", "indices": [1, 4, 7]})
    y, meta = load_samples(tmp_path / "b.safetensors")
    assert torch.equal(x, y) and meta == {"modality": "ct", "indices": [1, 4, 7]}
