"""The inversion step's speed choices (invcoss.inversion.step) against the plain fp32 eager step.

Every choice must leave a step's losses and gradients within STEP_TOLERANCE of the reference step
(fp32, contiguous, for-loop Adam, separate MAE passes, no compilation); reading the losses back
every k steps must change nothing at all; a compiled run must be deterministic. Random-weight
``vit_nano`` models at tiny sizes with random statistics: the cost of a step does not depend on them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from invcoss.inversion import CompiledStepWarning, InversionEngine, NonFiniteLossError
from invcoss.inversion.config import InversionConfig
from invcoss.inversion.step import STEP_TOLERANCE, resolve_step_settings
from invcoss.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = dict(
    compile_mode="off", precision="fp32", memory_format="contiguous", adam="for-loop", share_tokens=False
)


def make_engine(modality: str = "ct", **kw) -> InversionEngine:
    """An engine on a random-weight vit_nano (3D 16x32x32 or 2D 32x32) with random statistics."""
    torch.manual_seed(0)
    model = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
    g = torch.Generator().manual_seed(1)
    ndim = 3 if modality == "ct" else 2
    shape = (model.config.num_patches(ndim) + 1, model.config.embed_dim)
    stats = [(0.1 * torch.randn(shape, generator=g), 0.5 + torch.rand(shape, generator=g)) for _ in range(4)]
    base = dict(
        modality=modality, batch_size=4, min_batch_size=2, steps=3, warmup_steps=5, latent_dim=8,
        generator_channels=(8, 8, 4) if ndim == 2 else (8, 8, 4, 4), alpha_img=3e-3,
    )  # fmt: skip
    engine = InversionEngine(model, stats, InversionConfig(**(base | kw)), device="cpu", backend="torch")
    engine.start(8)
    engine.pool.push(0.1 * torch.randn(6, model.config.embed_dim, generator=g))
    return engine


def one_step(engine: InversionEngine) -> tuple[dict[str, float], list[torch.Tensor], torch.Tensor]:
    """The first step of batch 0: its values, the generator's gradients and the latents' gradient."""
    params, opts, _, rng = engine.begin_batch(0, 4)
    values = engine.step_async(params, opts, engine.random_mask(4, rng))
    grads = [p.grad.detach().clone() for p in engine._gen.parameters()]
    return dict(zip(engine.value_names, values.tolist())), grads, params.grad.detach().clone()


def assert_close(got, want, tol: float, what: str) -> None:
    for k in want:
        scale = max(abs(want[k]), 1e-12)
        assert abs(got[k] - want[k]) <= tol * scale, f"{what} {k}: {got[k]} vs {want[k]}"


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float, what: str) -> None:
    """The relative error in norm of all the gradients together (STEP_TOLERANCE's "grad")."""
    a = torch.cat([g.float().flatten() for g in got])
    b = torch.cat([g.flatten() for g in want])
    err = ((a - b).norm() / b.norm()).item()
    assert err <= tol, f"{what}: gradients off by {err:.3g} in norm, more than {tol}"


def test_auto_choices_per_device():
    cfg = InversionConfig.from_profile("quick", "ct")
    cpu = resolve_step_settings(cfg, "cpu")
    assert (cpu.compile_mode, cpu.precision, cpu.memory_format, cpu.adam) == (
        "off",
        "fp32",
        "channels_last",
        "fused",
    )
    cuda = resolve_step_settings(cfg, "cuda")
    assert cuda.compile_mode == "default" and cuda.adam == "fused"
    # bf16 only where the device has it: a GPU-less host reports none for CUDA.
    assert cuda.precision == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    )
    explicit = resolve_step_settings(cfg.replace(**REFERENCE), "cuda")
    assert (explicit.compile_mode, explicit.memory_format, explicit.adam) == ("off", "contiguous", "for-loop")


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"compile_mode": "fast"}, "compile_mode must be one of"),
        ({"precision": "fp16"}, "precision must be one of"),
        ({"memory_format": "nhwc"}, "memory_format must be one of"),
        ({"adam": "sgd"}, "adam must be one of"),
        ({"sync_every": 0}, "sync_every must be >= 1"),
    ],
)
def test_config_rejects_bad_step_choices(kw, message):
    with pytest.raises(ValueError, match=message):
        InversionConfig.from_profile("quick", "ct", **kw)


def test_shared_patch_embedding_gives_the_separate_passes_values():
    model = create_model("vit_nano", img_size_3d=(16, 32, 32))
    x, noise = torch.rand(3, 1, 16, 32, 32, requires_grad=True), torch.rand(3, 4)
    loss, feats, emb = model.loss_and_features(x, 0.75, noise)
    ref_loss = model(x, 0.75, noise)[0]
    ref_feats, ref_emb = model.unmasked_features(x)
    assert torch.equal(loss, ref_loss) and torch.equal(emb, ref_emb)
    assert all(torch.equal(a, b) for a, b in zip(feats, ref_feats, strict=True))
    (g,) = torch.autograd.grad(loss + sum(f.square().mean() for f in feats), x)
    (ref_g,) = torch.autograd.grad(ref_loss + sum(f.square().mean() for f in ref_feats), x)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="noise must have shape"):
        model.loss_and_features(x, 0.75, torch.rand(3, 5))


@pytest.mark.parametrize("modality", ["ct", "xray"])
def test_shared_tokens_keep_the_step_values(modality):
    want, want_g, _ = one_step(make_engine(modality, **REFERENCE))
    got, got_g, _ = one_step(make_engine(modality, **(REFERENCE | {"share_tokens": True})))
    assert_close(got, want, 1e-6, "shared tokens")
    assert_grads_close(got_g, want_g, 1e-5, "shared tokens")


@pytest.mark.parametrize("modality", ["ct", "xray"])
def test_default_cpu_step_is_within_tolerance_of_the_reference(modality):
    fast = make_engine(modality)
    assert fast.step_settings.memory_format == "channels_last" and fast.step_settings.adam == "fused"
    got, got_g, got_z = one_step(fast)
    want, want_g, want_z = one_step(make_engine(modality, **REFERENCE))
    tol = STEP_TOLERANCE["fp32"]
    assert_close(got, want, tol["loss"], "default step")
    assert_grads_close(got_g, want_g, tol["grad"], "default step")
    assert_grads_close([got_z], [want_z], tol["grad"], "default step latents")


@pytest.mark.parametrize("modality", ["ct", "xray"])
def test_bf16_step_is_within_its_tolerance(modality):
    got, got_g, got_z = one_step(make_engine(modality, precision="bf16"))
    want, want_g, want_z = one_step(make_engine(modality, **REFERENCE))
    tol = STEP_TOLERANCE["bf16"]
    assert_close(got, want, tol["loss"], "bf16 step")
    assert_grads_close(got_g, want_g, tol["grad"], "bf16 step")
    assert_grads_close([got_z], [want_z], tol["grad"], "bf16 step latents")


def test_masks_drawn_in_chunks_are_the_sequential_draws():
    engine = make_engine("ct")
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    chunk = engine.random_masks(4, 3, a)
    assert torch.equal(chunk, torch.stack([engine.random_mask(3, b) for _ in range(4)]))


def test_reading_losses_back_every_k_steps_changes_nothing():
    runs = {}
    for every in (1, 3):
        seen = []
        engine = make_engine("ct", sync_every=every, steps=2, warmup_steps=5)
        out = engine.generate(
            8, on_step=lambda s, seen=seen: seen.append((s.batch, s.step, s.losses["total"]))
        )
        runs[every] = (out, seen)
    ref, ref_seen = runs[1]
    assert [(b, s) for b, s, _ in ref_seen] == [(0, s) for s in range(1, 6)] + [(1, s) for s in range(1, 3)]
    out, seen = runs[3]
    assert seen == ref_seen
    assert torch.equal(out.images, ref.images)
    assert [r.curves for r in out.batches] == [r.curves for r in ref.batches]


def test_a_non_finite_loss_read_back_late_still_abandons_the_batch():
    engine = make_engine("ct", sync_every=4, warmup_steps=6, lr_latent=1e30, lr_generator=1e30)
    before = engine.state_tensors()
    with pytest.raises(NonFiniteLossError, match=r"batch 0, step [2-6]/6: the loss is not finite"):
        engine.invert_batch(0, 4)
    after = engine.state_tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_compiled_step_matches_eager_compiles_once_and_is_deterministic():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    kw = dict(compile_mode="default", modality="xray")
    compiled = make_engine(**kw)
    got, got_g, got_z = one_step(compiled)
    assert compiled.compile_seconds > 0
    assert compiled.compile_fallback is None  # its own check found the compiled step right
    want, want_g, want_z = one_step(make_engine("xray", **REFERENCE))
    tol = STEP_TOLERANCE["fp32"]
    assert_close(got, want, tol["loss"], "compiled step")
    assert_grads_close(got_g, want_g, tol["grad"], "compiled step")
    assert_grads_close([got_z], [want_z], tol["grad"], "compiled step latents")
    # A fresh generator (the 2D schedule makes one per batch) and the same batch size: no new graph.
    graphs = counters["stats"]["unique_graphs"]
    runs = [make_engine(**kw, steps=2, warmup_steps=2).generate(8) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(runs[0].images, runs[1].images)
    assert [r.curves for r in runs[0].batches] == [r.curves for r in runs[1].batches]


def test_a_compiled_step_that_drops_the_latents_gradient_is_set_aside():
    # What torch 2.11's inductor does to this step on CPU (the latents and the noise projector get
    # no gradient): stood in for by a "compiled" forward that cuts the latents off the graph.
    engine = make_engine("xray", **REFERENCE)
    engine._forward_fn = lambda params, mask: engine._forward(params.detach(), mask)
    with pytest.warns(CompiledStepWarning, match=r"latent gradients off by 1 in norm .* runs eagerly"):
        got, got_g, got_z = one_step(engine)
    assert engine.compile_fallback.startswith("latent gradients off by 1")
    assert engine._forward_fn == engine._forward
    want, want_g, want_z = one_step(make_engine("xray", **REFERENCE))
    assert got == want  # the step itself ran eagerly
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g)) and torch.equal(got_z, want_z)


def test_the_synchronous_step_is_checked_too():
    engine = make_engine("xray", **REFERENCE)
    engine._forward_fn = lambda params, mask: engine._forward(params.detach(), mask)
    params, opts, _, rng = engine.begin_batch(0, 4)
    with pytest.warns(CompiledStepWarning, match="latent gradients off by 1"):
        engine.step(params, opts, engine.random_mask(4, rng))
    assert engine.compile_fallback is not None and params.grad.norm() > 0


def test_the_check_names_the_pixels_when_they_are_what_is_trained():
    engine = make_engine("xray", **REFERENCE, generator="pixels")
    engine._forward_fn = lambda params, mask: engine._forward(params.detach() + 0 * params, mask)
    params, _, _, rng = engine.begin_batch(0, 4)
    mismatch = engine.check_compiled_step(params, engine.random_mask(4, rng))
    assert mismatch is not None and mismatch.startswith("pixel gradients off by 1")


def test_the_compiled_step_check_changes_nothing_it_does_not_report():
    # A compiled forward that is right: the check passes, warns nothing, and leaves the generator's
    # running statistics, the gradients and the values as one eager step leaves them.
    engine = make_engine("ct", **REFERENCE)
    engine._forward_fn = lambda params, mask: engine._forward(params, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompiledStepWarning)
        got, got_g, got_z = one_step(engine)
    assert engine.compile_fallback is None
    reference = make_engine("ct", **REFERENCE)
    want, want_g, want_z = one_step(reference)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g)) and torch.equal(got_z, want_z)
    buffers = dict(reference._gen.named_buffers())
    assert all(torch.equal(v, buffers[k]) for k, v in engine._gen.named_buffers())


def test_another_summation_order_is_not_a_mismatch():
    # The check guards against wrong compilations, not rounding: a relative drift of 1e-5 in every
    # term (and so in the gradients) passes.
    engine = make_engine("xray", **REFERENCE)

    def forward(params, mask):
        terms, emb = engine._forward(params, mask)
        return {k: v * (1 + 1e-5) for k, v in terms.items()}, emb

    engine._forward_fn = forward
    params, _, _, rng = engine.begin_batch(0, 4)
    assert engine.check_compiled_step(params, engine.random_mask(4, rng)) is None


def test_an_eager_step_runs_no_check(monkeypatch):
    engine = make_engine("xray", **REFERENCE)
    monkeypatch.setattr(engine, "check_compiled_step", lambda *a: pytest.fail("checked an eager step"))
    one_step(engine)
    assert engine.compile_seconds == 0


def test_the_check_names_a_loss_value_that_differs():
    engine = make_engine("xray", **REFERENCE)

    def forward(params, mask):
        terms, emb = engine._forward(params, mask)
        return terms | {"task": terms["task"] * 1.01}, emb

    engine._forward_fn = forward
    params, _, _, rng = engine.begin_batch(0, 4)
    problem = engine.check_compiled_step(params, engine.random_mask(4, rng))
    assert problem is not None and problem.startswith("task ")
    assert params.grad is None  # nothing accumulated
