"""Statistics over seeds (mean, sd, paired t, bootstrap) and the multi-seed forgetting report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from invcoss.cli import main
from invcoss.continual.experiment import ForgettingExperiment
from invcoss.continual.paired import bootstrap_interval, mean_sd, paired_difference, paired_t
from invcoss.continual.seeds import MEAN, SeedsResult, aggregate, run_seeds, seed_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0, 4.0], [0.3, -0.1, 0.25], [5.0, 5.0]])
def test_mean_sd_matches_statistics(values):
    mean, sd = mean_sd(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert sd == pytest.approx(statistics.stdev(values), abs=1e-15)


def test_mean_sd_of_one_value_has_no_sd():
    mean, sd = mean_sd([0.7])
    assert mean == 0.7 and math.isnan(sd)


def test_paired_t_known_values():
    d = [0.02, 0.03, 0.01, 0.025, 0.015]
    expected = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    assert paired_t(d) == pytest.approx(expected, rel=1e-12)
    assert paired_t([1.0, 2.0, 3.0]) == pytest.approx(2 * math.sqrt(3))
    assert paired_t([-0.5, -0.5]) == -math.inf
    assert math.isnan(paired_t([0.0, 0.0])) and math.isnan(paired_t([0.3]))


def test_bootstrap_interval_matches_the_normal_interval_of_a_large_sample():
    x = np.random.default_rng(1).normal(0.1, 1.0, 400)
    lo, hi = bootstrap_interval(x, resamples=20_000, level=0.95, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    lo90, hi90 = bootstrap_interval(x, resamples=20_000, level=0.90, seed=3)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_interval_is_seeded_and_bounded():
    x = [0.1, 0.4, 0.2, 0.35, 0.05]
    a = bootstrap_interval(x, resamples=500, seed=7)
    assert a == bootstrap_interval(x, resamples=500, seed=7)
    assert a != bootstrap_interval(x, resamples=500, seed=8)
    assert min(x) <= a[0] < statistics.fmean(x) < a[1] <= max(x)
    assert bootstrap_interval([0.2] * 3) == (0.2, 0.2)
    assert bootstrap_interval([0.4]) == (0.4, 0.4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(values=[]), "non-empty sequence"),
        (dict(values=[1.0], resamples=0), "resamples must be >= 1, got 0"),
        (dict(values=[1.0], level=1.0), r"level must be in \(0, 1\), got 1.0"),
    ],
)
def test_bootstrap_interval_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(**kwargs)


def test_paired_difference_summarises_the_differences():
    d = paired_difference("invcoss", "seq", "ct", "forgetting", [0.15, 0.14, 0.16], [0.13, 0.12, 0.125])
    diffs = [0.02, 0.02, 0.035]
    assert d.differences == pytest.approx(tuple(diffs))
    assert (d.mean, d.sd) == pytest.approx((statistics.fmean(diffs), statistics.stdev(diffs)))
    assert d.t == pytest.approx(paired_t(diffs)) and d.n == 3
    assert (d.low, d.high) == pytest.approx(bootstrap_interval(diffs), abs=1e-15)
    with pytest.raises(ValueError, match="one value of invcoss and of seq per seed, got 2 and 3"):
        paired_difference("invcoss", "seq", "ct", "forgetting", [0.1, 0.2], [0.1, 0.2, 0.3])


METHODS = ("seq", "er", "invcoss")
ORDER = ("xray", "ct", "mri")


def fake_rows(k: int) -> list[dict]:
    """Rows like ForgettingResult.rows(), with extra columns (numeric, text, bool) as others may add."""
    rows = []
    for i, method in enumerate(METHODS):
        for j, modality in enumerate(ORDER):
            forgetting = 0.0 if modality == "mri" else 0.1 * (3 - i) + 0.01 * j + 0.005 * k * (i + 1)
            rows.append(
                {
                    "method": method,
                    "modality": modality,
                    "loss_at_end": 0.5 + forgetting,
                    "forgetting": forgetting,
                    "forgetting_structured": forgetting / 2 + 0.001 * k,
                    "probe_accuracy": 0.6 + 0.1 * k,
                    "replay_bytes": 1000 * i,
                    "note": "text",
                    "flag": True,
                }
            )
    return rows


def test_aggregate_over_fake_rows():
    rows = [fake_rows(k) for k in range(3)]
    s = aggregate(rows, last="mri", resamples=2000)
    assert s.columns == [
        "loss_at_end",
        "forgetting",
        "forgetting_structured",
        "probe_accuracy",
        "replay_bytes",
    ]
    assert [(r["method"], r["modality"]) for r in s.table] == [
        (m, mod) for m in METHODS for mod in (*ORDER, MEAN)
    ]
    by = {(r["method"], r["modality"]): r for r in s.table}
    for method in METHODS:
        for modality in ORDER:
            for column in s.columns:
                values = [
                    next(r[column] for r in rs if (r["method"], r["modality"]) == (method, modality))
                    for rs in rows
                ]
                cell = by[method, modality]
                assert cell[f"{column}_mean"] == pytest.approx(statistics.fmean(values))
                assert cell[f"{column}_sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        # The mean row averages the modalities before the last stage, per seed.
        per_seed = [
            statistics.fmean(r["forgetting"] for r in rs if r["method"] == method and r["modality"] != "mri")
            for rs in rows
        ]
        assert by[method, MEAN]["forgetting_mean"] == pytest.approx(statistics.fmean(per_seed))
        assert by[method, MEAN]["forgetting_sd"] == pytest.approx(statistics.stdev(per_seed))
    # Paired differences of the forgetting columns, per pair and modality, then the mean.
    keys = [(d.a, d.b, d.modality, d.column) for d in s.differences]
    assert keys == [
        (a, b, mod, c)
        for a, b in (("invcoss", "seq"), ("invcoss", "er"), ("er", "seq"))
        for mod in ("xray", "ct", MEAN)  # mri, the last stage, has forgotten nothing yet
        for c in ("forgetting", "forgetting_structured")
    ]
    d = next(
        d for d in s.differences if (d.a, d.b, d.modality, d.column) == ("invcoss", "seq", "ct", "forgetting")
    )
    # invcoss - seq on ct: -0.2 + 0.005 k (3 - 1) -> -0.2, -0.19, -0.18
    assert d.differences == pytest.approx((-0.2, -0.19, -0.18))
    assert (d.mean, d.sd, d.t) == pytest.approx((-0.19, 0.01, -0.19 / (0.01 / math.sqrt(3))))
    assert d.low <= d.mean <= d.high and d.n == 3


def test_aggregate_options_and_errors():
    rows = [fake_rows(k) for k in range(2)]
    s = aggregate(rows, last="mri", compare=["probe_accuracy"], pairs=[("er", "seq")], resamples=100)
    assert [(d.a, d.b, d.modality, d.column) for d in s.differences] == [
        ("er", "seq", mod, "probe_accuracy") for mod in (*ORDER, MEAN)
    ]
    one_method = [[r for r in rs if r["method"] == "seq"] for rs in rows]
    assert aggregate(one_method, last="mri").differences == []
    with pytest.raises(ValueError, match=r"compare names column\(s\) \['note'\]"):
        aggregate(rows, last="mri", compare=["note"])
    with pytest.raises(ValueError, match="do not share their methods and modalities"):
        aggregate([rows[0], rows[1][:-1]], last="mri")
    with pytest.raises(ValueError, match="at least one repeat"):
        aggregate([], last="mri")


def test_seed_experiment_gives_disjoint_phantoms_and_own_run_seeds():
    exp = ForgettingExperiment.from_size("tiny")
    repeats = [seed_experiment(exp, k) for k in range(4)]
    phantom_seeds = [s for e in repeats for s in (e.seed, e.seed + 1)]  # training, held-out
    assert len(set(phantom_seeds)) == 8
    assert [e.base.seed for e in repeats] == [0, 1, 2, 3]
    assert repeats[0] == exp
    with pytest.raises(ValueError, match="seed index must be >= 0, got -1"):
        seed_experiment(exp, -1)


@pytest.mark.slow
def test_forgetting_seeds_two_repeats_end_to_end(tmp_path):
    out = tmp_path / "exp"
    args = [
        "experiment",
        "forgetting",
        "--size",
        "tiny",
        "--methods",
        "seq,er",
        "--out",
        str(out),
        "--seeds",
        "2",
    ]
    runner = CliRunner()
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1].startswith("mean forgetting over ct, 2 seeds: seq ")
    repeats = [json.loads((out / f"seed-{k}" / "experiment.json").read_text()) for k in range(2)]
    # Each repeat has its own phantoms (training and held-out seeds) and its own run seed.
    assert [(e["experiment"]["seed"], e["experiment"]["base"]["seed"]) for e in repeats] == [(0, 0), (2, 1)]
    train = [
        (out / f"seed-{k}" / "phantoms" / "train" / "xray" / "xray_0000.png").read_bytes() for k in range(2)
    ]
    test = [
        (out / f"seed-{k}" / "phantoms" / "test" / "xray" / "xray_0000.png").read_bytes() for k in range(2)
    ]
    assert len({*train, *test}) == 4
    # The summary is the statistics of the repeats' own tables.
    table = {(r["method"], r["modality"]): r for r in csv.DictReader((out / "seeds.csv").open())}
    for method in ("seq", "er"):
        values = [
            next(r["forgetting"] for r in e["rows"] if (r["method"], r["modality"]) == (method, "ct"))
            for e in repeats
        ]
        assert float(table[method, "ct"]["forgetting_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(table[method, "ct"]["forgetting_sd"]) == pytest.approx(statistics.stdev(values))
    paired = list(csv.DictReader((out / "seeds_paired.csv").open()))
    assert [(p["a"], p["b"], p["modality"]) for p in paired if p["column"] == "forgetting"] == [
        ("er", "seq", "ct"),
        ("er", "seq", MEAN),
    ]
    # Every forgetting column of the repeats' tables is compared, the region and raw ones too.
    columns = {p["column"] for p in paired}
    assert {"forgetting_structured", "raw_forgetting", "probe_forgetting"} <= columns
    assert all("forgetting" in c for c in columns)
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["phantom_seeds"] == [0, 2]
    assert [len(s["training_mae"]) for s in summary["stage1"]] == [2, 2]  # the tiny size's 2 epochs
    assert (out / "seeds.png").exists() and "| er - seq | ct | forgetting |" in (out / "seeds.md").read_text()
    # Without --resume the folder is refused; with it the finished repeats are read back, not rerun.
    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "--resume" in r.output
    before = (out / "seeds.md").read_text()
    events = []
    result = run_seeds(
        out,
        dataclasses.replace(ForgettingExperiment.from_size("tiny"), methods=("seq", "er")),
        seeds=2,
        resume=True,
        on_event=lambda k, e: events.append((k, e.phase)),
    )
    assert events == [(0, "seed"), (1, "seed")]
    assert (out / "seeds.md").read_text() == before == result.markdown()
    r = runner.invoke(main, [*args[:-1], "0"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_forgetting_seeds_user_errors(tmp_path):
    runner = CliRunner()
    args = ["experiment", "forgetting", "--size", "tiny", "--out", str(tmp_path / "exp")]
    r = runner.invoke(main, [*args, "--seeds", "0"])
    assert r.exit_code == 2 and "--seeds" in r.output and "0 is not in the range x>=1" in r.output
    (tmp_path / "exp" / "seed-1" / "runs").mkdir(parents=True)
    r = runner.invoke(main, [*args, "--seeds", "2"])
    assert r.exit_code == 2 and "already holds repeats seed-1" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "exp" / "seed-0").exists()
    with pytest.raises(ValueError, match="seeds must be an integer >= 1, got 0"):
        run_seeds(tmp_path / "other", ForgettingExperiment.from_size("tiny"), seeds=0)


def test_report_files_of_fake_repeats(tmp_path):
    exp = dataclasses.replace(ForgettingExperiment.from_size("quick"), seed=0)
    for n in (1, 3):
        rows = [fake_rows(k) for k in range(n)]
        result = SeedsResult(
            tmp_path, exp, list(range(n)), rows, [], aggregate(rows, last="mri", resamples=200), 1.0
        )
        files = result.write()

        def refuse(name):
            raise ValueError(f"{name} is not JSON")

        saved = json.loads(files["json"].read_text(), parse_constant=refuse)  # NaN is written as null
        assert saved["seeds"] == list(range(n)) and saved["phantom_seeds"] == [2 * k for k in range(n)]
        sd = saved["summary"][0]["forgetting_sd"]
        assert sd is None if n == 1 else sd == pytest.approx(result.summary.table[0]["forgetting_sd"])
        assert len(list(csv.DictReader(files["csv"].open()))) == len(METHODS) * (len(ORDER) + 1)
        assert len(list(csv.DictReader(files["paired_csv"].open()))) == len(result.summary.differences) == 18
        assert Image.open(files["png"]).size[0] == 3 * 420  # xray, ct and their mean
        assert files["md"].read_text() == result.markdown()
    assert "| invcoss - seq | ct | forgetting | -0.1900 | 0.0100 | -32.91 | [" in result.markdown()


@pytest.mark.slow
def test_parallel_repeats_give_the_same_numbers(tmp_path):
    exp = dataclasses.replace(ForgettingExperiment.from_size("tiny"), methods=("seq",))
    serial = run_seeds(tmp_path / "serial", exp, seeds=2)
    events = []
    parallel = run_seeds(
        tmp_path / "parallel", exp, seeds=2, jobs=2, on_event=lambda k, e: events.append((k, e.phase))
    )
    assert sorted(events) == [(0, "seed"), (1, "seed")]
    assert json.dumps(parallel.rows) == json.dumps(serial.rows)  # NaN (no background) compares as text
    for k in range(2):
        a = (
            tmp_path / "serial" / f"seed-{k}" / "runs" / "seq" / "stage2_xray" / "model.safetensors"
        ).read_bytes()
        b = (
            tmp_path / "parallel" / f"seed-{k}" / "runs" / "seq" / "stage2_xray" / "model.safetensors"
        ).read_bytes()
        assert a == b
    with pytest.raises(ValueError, match="jobs must be an integer >= 1, got 0"):
        run_seeds(tmp_path / "other", exp, seeds=2, jobs=0)
    with pytest.raises(ValueError, match="use jobs=1 with a CUDA device"):
        run_seeds(tmp_path / "other", exp, seeds=2, jobs=2, device="cuda")
