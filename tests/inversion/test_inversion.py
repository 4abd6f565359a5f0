"""The inversion engine (Eq. 6): profiles, losses that fall, statistics closer than noise, L_rep, checks.

Two models: the packaged CT ``vit_nano`` (the default of ``invcoss-cli invert``) for the paper's
loss weights, and a tiny ``vit_nano`` (3D input 16x32x32, 4 tokens) pre-trained for a few seconds on
CT phantom windows for the cheaper checks. Inversions run a few dozen steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from invcoss.assets import load_default
from invcoss.data import ct_phantom
from invcoss.feature_stats import collect_feature_stats
from invcoss.inversion import Inverter, plan_batches
from invcoss.inversion.config import ALPHA_IMG_QUICK, InversionConfig
from invcoss.inversion.report import frechet_distance, mean_pairwise_cosine
from invcoss.modality import canonical_modality
from invcoss.models import create_model
from invcoss.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def ct_windows() -> torch.Tensor:
    """30 windows (1, 16, 32, 32) of six CT phantoms in HU/1024, as the CT preprocessing makes them."""
    out = []
    for i in range(6):
        hu = torch.from_numpy(ct_phantom(0, i, (48, 64, 64), (3.0, 5.0, 5.0))).float()
        vol = F.interpolate(hu.clamp(-1024, 1024)[None, None] / 1024, size=(48, 32, 32), mode="trilinear")
        out += [vol[:, :, s : s + 16] for s in range(0, 33, 8)]
    return torch.cat(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(model, stats, data)``: a tiny vit_nano pre-trained on CT windows, and its statistics.

    Pre-training seed 1: the repulsion test below compares 3 batches of 2 after 10 steps, which is
    noisy on a model this small. Mean pairwise cosine with L_rep on / off, per pre-training seed
    (masks drawn per sample): 0: 0.561 / 0.488 (the one draw where repulsion does not show),
    1: 0.976 / 0.986, 2: 0.952 / 0.977.
    """
    data = ct_windows()
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
    config = PretrainConfig(epochs=15, batch_size=8, lr=2e-3, seed=1)
    result = pretrain(model, data, tmp_path_factory.mktemp("ckpt"), config, modality="ct", device="cpu")
    assert result.losses[-1] < 0.5 * result.losses[0]
    return model.eval(), collect_feature_stats(model, data, modality="ct"), data


def tiny(**kw) -> InversionConfig:
    base = dict(
        modality="ct", batch_size=2, min_batch_size=2, steps=15, warmup_steps=30, generator_every=10, latent_dim=16,
        generator_channels=(16, 8, 8, 4), lr_generator=1e-3,
    )  # fmt: skip
    return InversionConfig(**(base | kw))


@pytest.fixture(scope="module")
def packaged():
    return load_default("ct")


@pytest.fixture(scope="module")
def paper_weights_run(packaged):
    """The quick CT profile (paper loss weights) on the packaged model, shortened: 2 batches of 2."""
    model, stats = packaged
    config = InversionConfig.from_profile("quick", "ct", warmup_steps=16, steps=8)
    return Inverter(model, stats, config, backend="torch").generate(4)


@pytest.fixture(scope="module")
def strong_rep_runs(trained):
    """The tiny model with L_rep on and off, same seed and steps, 3 batches of 2.

    The gradient of L_norm (Eq. 3, a sum of unsquared norms over thousands of features) is about
    7000 times that of L_rep here, so at the paper's alpha_rep = 0.1 the term moves nothing
    measurable in a few steps (mean pairwise cosine 0.9636 both ways); alpha_rep = 1e4 gives it a say.
    """
    model, stats, _ = trained
    runs = {}
    for losses in (("task", "norm", "img", "rep"), ("task", "norm", "img")):
        config = tiny(losses=losses, alpha_rep=1e4, steps=10, warmup_steps=20)
        runs["on" if "rep" in losses else "off"] = Inverter(model, stats, config, backend="torch").generate(6)
    return runs


def test_paper_profile_is_appendix_c():
    for modality, expect in (
        ("xray", (320, 1000, 1000, 1, 128)),
        ("path", (320, 1000, 1000, 1, 128)),
        ("ct", (48, 500, 2000, 10, 512)),
        ("mri", (48, 500, 2000, 10, 512)),
    ):
        c = InversionConfig.from_profile("paper", modality)
        assert (c.batch_size, c.steps, c.warmup_steps, c.generator_every, c.latent_dim) == expect
        assert (c.lr_generator, c.lr_latent, c.alpha_norm, c.alpha_img, c.alpha_rep) == (
            2e-4,
            0.05,
            1.0,
            0.1,
            0.1,
        )
        assert c.generator == "invunet" and c.generator_channels is None and c.upsample == 1
        assert c.losses == ("task", "norm", "img", "rep") and c.mask_ratio == 0.75
    c = InversionConfig.from_profile("paper", "ct")
    assert [c.steps_for(b) for b in (0, 1, 9, 10, 11)] == [2000, 500, 500, 2000, 500]
    assert InversionConfig.from_profile("quick", "ct").upsample == 2
    assert c.tv_reduction == "sum" and c.min_batch_size == 4  # Eq. 8 as written
    q = InversionConfig.from_profile("quick", "ct")
    assert (q.batch_size, q.warmup_steps, q.steps, q.alpha_img) == (8, 300, 150, ALPHA_IMG_QUICK)
    assert canonical_modality("path") == "pathology"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"losses": ("task", "bogus")}, "losses must be a non-empty subset"),
        ({"losses": ()}, "losses must be a non-empty subset"),
        ({"generator": "gan"}, "generator must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr_latent": 0.0}, "lr_latent must be > 0"),
        ({"alpha_rep": -1.0}, "alpha_rep must be a finite number >= 0"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
        ({"spacing": (1.0, 2.0)}, "spacing must be 3 positive values"),
        ({"modality": "pet"}, "unknown modality 'pet'"),
    ],
)
def test_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        InversionConfig(**kw)


def test_config_rejects_unknown_fields_and_profiles():
    with pytest.raises(TypeError, match=r"unknown InversionConfig field\(s\) \['step'\]"):
        InversionConfig.from_profile("quick", "ct", step=3)
    with pytest.raises(ValueError, match="unknown inversion profile 'fast'"):
        InversionConfig.from_profile("fast", "ct")


@pytest.mark.slow
def test_each_enabled_loss_term_falls(paper_weights_run, strong_rep_runs):
    """The first step's value against the final images' value, with the same mask.

    L_task, L_norm and L_img at the paper's weights; L_rep where its weight lets it act (see
    ``strong_rep_runs``; at alpha_rep = 0.1 it drifts with the other terms).
    """
    for batch in paper_weights_run.batches:
        for term in ("task", "norm", "img"):
            assert batch.final[term] < batch.curves[term][0], (batch.index, term)
        assert batch.curves["total"][-1] < batch.curves["total"][0]
    first, *later = strong_rep_runs["on"].batches
    assert first.curves["rep"][0] == 0.0  # an empty pool during the first batch
    for batch in later:
        assert batch.final["rep"] < batch.curves["rep"][0], batch.index


def numpy_stat_loss(model, stats, x: torch.Tensor) -> float:
    """Eq. 3 summed over blocks, in float64 numpy: an independent check of the recorded values."""
    with torch.no_grad():
        feats = [f.double().numpy() for f in model.block_features(x)]
    total = 0.0
    for f, m, v in zip(feats, stats.mean, stats.var):
        total += np.linalg.norm(f.mean(0) - m.double().numpy()) + np.linalg.norm(
            f.var(0) - v.double().numpy()
        )
    return total


@pytest.mark.slow
def test_synthetic_statistics_are_closer_than_noise(packaged, paper_weights_run):
    model, stats = packaged
    g = torch.Generator().manual_seed(5)
    for batch in paper_weights_run.batches:
        noise = torch.rand(batch.images.shape, generator=g) * 2 - 1  # uniform over the CT input range
        synthetic = numpy_stat_loss(model, stats, batch.images)
        assert synthetic == pytest.approx(batch.stat_loss, rel=1e-4)
        assert synthetic < 0.7 * numpy_stat_loss(model, stats, noise), batch.index
        assert batch.stat_loss < 0.7 * batch.noise_stat_loss, batch.index


def test_images_are_in_the_ct_input_range(paper_weights_run):
    x = paper_weights_run.images
    assert x.shape == (4, 1, 16, 96, 96) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.std()) > 0.05  # not a constant image


def test_repulsion_lowers_the_mean_pairwise_cosine(strong_rep_runs):
    """L_rep on against off, same seed and steps (see ``strong_rep_runs`` for the weight)."""
    on, off = (mean_pairwise_cosine(strong_rep_runs[k].embeddings) for k in ("on", "off"))
    assert on < off - 0.01


@pytest.mark.parametrize("generator", ["bottomup", "pixels"])
def test_other_generators_lower_the_statistics_loss(trained, generator):
    model, stats, _ = trained
    config = tiny(generator=generator, generator_channels=(16, 8, 8, 4) if generator == "bottomup" else None)
    batch = Inverter(model, stats, config, backend="torch").generate(2).batches[0]
    assert batch.images.shape == (2, 1, 16, 32, 32)
    assert batch.final["norm"] < batch.curves["norm"][0]


def test_switched_off_terms_are_not_computed(trained):
    model, stats, _ = trained
    result = Inverter(
        model, stats, tiny(losses=("norm",), steps=2, warmup_steps=2), backend="torch"
    ).generate(2)
    assert set(result.batches[0].curves) == {"step", "norm", "total"}
    assert result.batches[0].curves["norm"] == result.batches[0].curves["total"]


def test_statistics_of_another_model_or_modality_are_refused(trained):
    model, stats, _ = trained
    other = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 64, 64))
    with pytest.raises(ValueError, match="collected with vit_nano .* but the model is vit_nano"):
        Inverter(other, stats, tiny())
    with pytest.raises(ValueError, match="the statistics are for ct, not mri"):
        Inverter(model, stats, tiny(modality="mri"))
    pairs = list(zip(stats.mean, stats.var))
    with pytest.raises(ValueError, match=r"hold 3 blocks .* has 4 blocks"):
        Inverter(model, pairs[:3], tiny())
    with pytest.raises(ValueError, match="bottleneck is a single voxel"):
        Inverter(model, stats, tiny(generator_channels=(8, 8, 4, 4, 4), upsample=2))


def test_state_round_trip_continues_identically(trained):
    """What a resumed run relies on: restoring the carried state reproduces the next batch exactly."""
    model, stats, _ = trained
    config = tiny(steps=3, warmup_steps=3)
    a = Inverter(model, stats, config, backend="torch")
    a.start(6)
    a.invert_batch(0, 2)
    state = {k: v.clone() for k, v in a.state_tensors().items()}
    expect = a.invert_batch(1, 2)
    b = Inverter(model, stats, config, backend="torch")
    b.start(6)
    b.load_state_tensors(state, batch=1)
    got = b.invert_batch(1, 2)
    assert torch.equal(got.images, expect.images) and got.curves == expect.curves


def test_report_measures_against_independent_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * 2 + 1
    an = a.double().numpy() / np.linalg.norm(a.double().numpy(), axis=1, keepdims=True)
    pairs = [an[i] @ an[j] for i in range(40) for j in range(40) if i != j]
    assert mean_pairwise_cosine(a) == pytest.approx(np.mean(pairs), rel=1e-12)
    # Fréchet distance: Tr (S_a S_b)^(1/2) from the eigenvalues of the (non-symmetric) product.
    x, y = a.double().numpy(), b.double().numpy()
    sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    expect = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expect, rel=1e-9)
    assert frechet_distance(a[:3], a[:3]) == pytest.approx(0.0, abs=1e-9)  # rank-deficient covariances


@pytest.mark.parametrize(
    "n, batch_size, minimum, expect",
    [
        (5, 2, 4, [5]),  # no 2- or 1-sample tail: one batch of 5
        (5, 2, 1, [2, 2, 1]),  # min_batch_size=1 is the plain split
        (10, 4, 4, [5, 5]),
        (9, 8, 4, [5, 4]),
        (16, 8, 4, [8, 8]),
        (17, 8, 4, [6, 6, 5]),
        (100, 48, 4, [34, 33, 33]),
        (320, 320, 4, [320]),
    ],
)
def test_batches_are_planned_between_the_minimum_and_the_maximum(n, batch_size, minimum, expect):
    sizes = plan_batches(n, batch_size, minimum)
    assert sizes == expect and sum(sizes) == n
    assert min(sizes) >= minimum and max(sizes) <= max(batch_size, 2 * minimum - 1)


def test_every_plan_keeps_the_minimum():
    for n in range(4, 60):
        for b in range(1, 12):
            sizes = plan_batches(n, b, 4)
            assert sum(sizes) == n and min(sizes) >= 4 and max(sizes) - min(sizes) <= 1, (n, b, sizes)
            assert max(sizes) <= max(b, 7), (n, b, sizes)


def test_fewer_samples_than_the_minimum_make_one_batch_with_a_warning(packaged):
    with pytest.warns(UserWarning, match="3 samples are fewer than min_batch_size 4"):
        assert plan_batches(3, 8, 4) == [3]
    with pytest.raises(ValueError, match="min_batch_size must be >= 1, got 0"):
        plan_batches(3, 8, 0)
    with pytest.raises(ValueError, match="min_batch_size must be >= 1, got 0"):
        InversionConfig(min_batch_size=0)
    assert Inverter(*packaged, InversionConfig.from_profile("quick", "ct")).batch_sizes(5) == [5]


@pytest.fixture(scope="module")
def term_runs(trained):
    """A test per term of Eq. 6 that fails when the term is dropped from the objective (L_rep's is
    ``test_repulsion_lowers_the_mean_pairwise_cosine``): one batch of 4 on the tiny model with L_task, L_norm and L_img, and with each dropped in turn.

    Same seed, steps and weights (the config's defaults: alpha_img 0.1 on Eq. 8's sum), so a
    difference is the dropped term's. Without L_img the mean |gradient| is 0.076, with it 0.039.
    """
    model, stats, _ = trained
    runs = {}
    for dropped in (None, "task", "norm", "img"):
        losses = tuple(t for t in ("task", "norm", "img") if t != dropped)
        config = tiny(losses=losses, batch_size=4, warmup_steps=12)
        runs[dropped] = Inverter(model, stats, config, backend="torch").generate(4).batches[0]
    return runs


def mean_abs_gradient(x: torch.Tensor) -> float:
    """Mean |difference| of neighbouring voxels along H and W (what L_img sums)."""
    return float(
        ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2
    )


@pytest.mark.slow
def test_dropping_l_norm_leaves_the_statistics_unmatched(term_runs):
    """In 27 steps L_norm lowers the stat-matching loss by 8-22% on this tiny model, depending on the
    pre-training (ratios 0.92, 0.85, 0.86 for pre-training seeds 0, 1, 2; 0.78 for seed 0 with the
    masks drawn per batch before)."""
    assert term_runs[None].stat_loss < 0.95 * term_runs["norm"].stat_loss


@pytest.mark.slow
def test_dropping_l_img_leaves_the_images_rougher(term_runs):
    """At the default weight and reduction the TV prior smooths the samples measurably."""
    assert mean_abs_gradient(term_runs[None].images) < 0.8 * mean_abs_gradient(term_runs["img"].images)


@pytest.mark.slow
def test_dropping_l_task_leaves_the_masked_reconstruction_worse(trained):
    """The MAE's masked reconstruction loss of the final images, averaged over 8 fixed masks.

    Against L_norm (thousands) at weight 1 the term (about 1.9) moves nothing measurable in a few
    steps (1.913 with it, 1.918 without), so here L_norm's weight is 1e-3 in both runs: L_task and
    L_norm against L_norm alone.
    """
    model, stats, _ = trained
    term_runs = {}
    for dropped, losses in ((None, ("task", "norm")), ("task", ("norm",))):
        config = tiny(losses=losses, batch_size=4, warmup_steps=12, alpha_norm=1e-3)
        term_runs[dropped] = Inverter(model, stats, config, backend="torch").generate(4).batches[0]
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(4, model.config.num_patches(3), generator=g) for _ in range(8)]

    def task_loss(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(np.mean([float(model(x, 0.75, noise=m)[0]) for m in masks]))

    assert task_loss(term_runs[None].images) < 0.9 * task_loss(term_runs["task"].images)


@pytest.mark.slow
def test_the_quick_ct_tv_weight_smooths_the_samples(packaged):
    """The quick CT profile's alpha_img acts at its own size: 10 steps of one batch of 4, on and off.

    Here the mean |gradient| is 0.019 with the prior and 0.027 without (at 300 steps and 5 samples:
    23.8 and 27.8 HU).
    """
    model, stats = packaged
    grads = {}
    for losses in (("task", "norm", "img", "rep"), ("task", "norm", "rep")):
        config = InversionConfig.from_profile("quick", "ct", warmup_steps=10, losses=losses)
        assert config.alpha_img == ALPHA_IMG_QUICK and config.tv_reduction == "sum"
        images = Inverter(model, stats, config, backend="torch").generate(4).images
        grads["img" in losses] = mean_abs_gradient(images)
    assert grads[True] < 0.85 * grads[False]
