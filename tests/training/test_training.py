"""The training entry points: one epoch loop for both, and no change to the caller's random state.

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


def test_one_training_epoch_for_both_loops():
    # pretrain and the continual stages step through invcoss.training.train_epoch (typed events).
    from invcoss.training import Step, TrainStep, train_epoch

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    events: list[TrainStep] = []

    def loss_of(x):
        loss = model(x).square().mean()
        return loss, {"mse": float(loss.detach())}

    steps = [
        Step("current", 2, lambda: loss_of(torch.ones(2, 3))),
        Step("ct", 6, lambda: loss_of(torch.zeros(6, 3))),
    ]
    means = train_epoch(model, opt, steps, epoch=1, epochs=3, lr_at=lambda e: e / 10, on_step=events.append)
    assert [(e.epoch, e.step, e.steps, e.source, e.lr) for e in events] == [
        (2, 1, 2, "current", 0.1),
        (2, 2, 2, "ct", 0.15),
    ]
    assert events[1].done == 4 and events[1].total == 6
    expected = (2 * events[0].losses["mse"] + 6 * events[1].losses["mse"]) / 8  # per-sample mean
    assert means["mse"] == pytest.approx(expected)
    bad = [Step("current", 1, lambda: (torch.tensor(float("nan"), requires_grad=True), {}))]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"stage 2 \(ct\): the loss became nan at epoch 1, step 1"):
        train_epoch(model, opt, bad, epoch=0, epochs=1, lr_at=lambda e: 0.1, where="stage 2 (ct)")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied


def test_configs_share_one_schedule_and_one_from_dict():
    import dataclasses
    import json

    from invcoss.configs import config_from_dict
    from invcoss.data import PreprocessConfig, get_config
    from invcoss.training import TrainingSchedule

    shared = {f.name for f in dataclasses.fields(TrainingSchedule)}
    cont = ContinualConfig.from_profile("quick", order=("ct",), epochs=3, lr=2e-3, warmup_epochs=1)
    pre = PretrainConfig(epochs=3, batch_size=cont.batch_size, lr=2e-3, warmup_epochs=1)
    assert cont.schedule() == pre.schedule() and set(dataclasses.asdict(cont.schedule())) == shared
    for cls in (ContinualConfig, PretrainConfig):  # validated once, in the shared base
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            cls(mask_ratio=1.0)
    for config in (cont, InversionConfig.from_profile("quick", "ct"), get_config("xray", "quick")):
        again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
        with pytest.raises(ValueError, match=r"has no field\(s\) \['bogus'\]"):
            type(config).from_dict({**config.to_dict(), "bogus": 1})
    assert config_from_dict(PreprocessConfig, get_config("ct", "quick").to_dict()).size == (16, 96, 96)
