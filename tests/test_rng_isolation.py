"""No public entry point changes the caller's global random state, and seeded work stays seeded.

Each call below would reset torch's global generator if it seeded it in the open (the training
loops do seed it: the MAE draws its masks from it). The state before and after must be equal, and
the same call twice must give the same numbers whatever the caller's state was.
"""

import pytest
import torch

from invcoss.continual import ContinualConfig, run_continual
from invcoss.continual.eval import evaluate_run
from invcoss.data import write_phantoms
from invcoss.feature_stats import collect_feature_stats
from invcoss.inversion import InversionConfig, InversionEngine
from invcoss.models import create_model
from invcoss.pretrain import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _continual(tmp_path, name):
    cfg = ContinualConfig.from_profile(
        "quick",
        method="er",
        order=("xray", "pathology"),
        img_size_2d=32,
        epochs=1,
        batch_size=4,
        stats_batch_size=4,
    )
    g = torch.Generator().manual_seed(1)
    data = {m: torch.rand(8, 3, 32, 32, generator=g) for m in cfg.order}
    run_continual(data, tmp_path / name, cfg, device="cpu")
    return tmp_path / name, data


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("vit_nano", img_size_2d=32)


def _inversion_engine():
    stats = [(torch.zeros(5, 96), torch.ones(5, 96))] * 4
    cfg = InversionConfig.from_profile(
        "quick", "xray", batch_size=2, steps=2, warmup_steps=2, latent_dim=8, generator_channels=(8, 8, 4)
    )
    return InversionEngine(_model(), stats, cfg, backend="torch")


# name -> (set-up outside the measured window, the call measured)
CALLS = {
    "pretrain": (
        lambda tmp: (_model(), torch.ones(8, 3, 32, 32) * 0.5),
        lambda tmp, a: (
            pretrain(a[0], a[1], tmp / "p", PretrainConfig(epochs=1, batch_size=4), device="cpu").losses
        ),
    ),
    "run_continual": (lambda tmp: None, lambda tmp, a: _continual(tmp, "c")[0]),
    "InversionEngine.generate": (lambda tmp: _inversion_engine(), lambda tmp, inv: inv.generate(2).images),
    "collect_feature_stats": (
        lambda tmp: _model(),
        lambda tmp, model: collect_feature_stats(
            model, torch.ones(4, 3, 32, 32), modality="xray", batch_size=2
        ).mean[0],
    ),
    "write_phantoms": (lambda tmp: None, lambda tmp, a: write_phantoms(tmp / "ph", "xray", 1, size=(64, 64))),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_callers_global_rng_state_is_untouched(name, tmp_path):
    setup, call = CALLS[name]
    args = setup(tmp_path)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    call(tmp_path, args)
    assert torch.equal(torch.get_rng_state(), before), f"{name} changed the global RNG state"


def test_seeded_training_gives_the_same_numbers_whatever_the_callers_state(tmp_path):
    losses = []
    setup, call = CALLS["pretrain"]
    for caller_seed in (0, 99):
        args = setup(tmp_path)
        torch.manual_seed(caller_seed)
        losses.append(call(tmp_path / str(caller_seed), args))
    assert losses[0] == losses[1]


def test_evaluation_keeps_the_callers_state(tmp_path):
    run, data = _continual(tmp_path, "run")
    torch.manual_seed(7)
    before = torch.get_rng_state()
    evaluate_run(run, data, repeats=1, batch_size=4, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
