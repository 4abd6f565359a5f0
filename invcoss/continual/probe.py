"""Linear-probe accuracy on frozen features: a labelled CSV, its samples, and a logistic regression.

The labelled format is a CSV file with a header and one row per scan::

    file,label,split
    scans/case01.nii.gz,tumour,train
    scans/case02.nii.gz,healthy,test

- ``file``: a NIfTI volume or a picture, relative to the CSV's folder (or absolute);
- ``label``: any text; the classes are the distinct labels;
- ``split`` (optional column): ``train`` or ``test``. Without it a seeded ``test_fraction`` of the
  files is held out (at least one file each side).

Every file goes through the modality's preprocessing at the model's input size
(:func:`invcoss.data.config_for_input`), and all samples cut from one file (CT/MRI windows,
pathology patches) carry its label and its split, so no scan is on both sides.

The probe (:func:`linear_probe`) standardises the frozen ``model.embed`` features with the
training mean and standard deviation and fits a multinomial logistic regression with L2 penalty by
L-BFGS; the score is the accuracy on the test samples.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invcoss.data import Preprocessor, ReadError, config_for_input

__all__ = ["LabelledSet", "linear_probe", "probe_accuracy", "read_labelled_csv"]


@dataclass
class LabelledSet:
    """The preprocessed samples of a labelled CSV.

    Attributes:
        modality: the modality the files were read as.
        source: the CSV path.
        classes: the sorted distinct labels.
        samples: ``(N, C, *S)`` float32.
        targets: ``(N,)`` class indices into ``classes``.
        test: ``(N,)`` bool, True for held-out samples.
    """

    modality: str
    source: Path
    classes: list[str]
    samples: Tensor
    targets: Tensor
    test: Tensor


def read_labelled_csv(
    path: str | os.PathLike,
    modality: str,
    input_size: tuple[int, ...],
    channels: int | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> LabelledSet:
    """Read a labelled CSV (module docstring) and preprocess its files at ``input_size``.

    Raises:
        ValueError: a missing column, file or split value, fewer than two classes or files, an
            unreadable file (named), or no training or no test sample.

    Example:
        >>> import tempfile, pathlib
        >>> from invcoss.data import write_phantoms
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> files = write_phantoms(d, "xray", 4, size=(32, 32))
        >>> rows = "\\n".join(f"{p.name},{'ab'[i % 2]}" for i, p in enumerate(files))
        >>> _ = (d / "labels.csv").write_text("file,label\\n" + rows + "\\n")
        >>> s = read_labelled_csv(d / "labels.csv", "xray", (32, 32), channels=3, test_fraction=0.5)
        >>> s.classes, tuple(s.samples.shape), int(s.test.sum())
        (['a', 'b'], (4, 3, 32, 32), 2)
    """

    path = Path(path)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except OSError as e:
        raise ValueError(f"cannot read labelled CSV {path}: {e.strerror or e}") from None
    if "file" not in header or "label" not in header:
        raise ValueError(f"labelled CSV {path} needs the columns file,label[,split]; its header is {header}")
    rows = [r for r in rows if r.get("file")]
    if len(rows) < 2:
        raise ValueError(f"labelled CSV {path} lists {len(rows)} file(s); a probe needs at least two")
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise ValueError(f"labelled CSV {path} has a single class {classes}; a probe needs at least two")
    if "split" in header:
        bad = sorted({r["split"] for r in rows} - {"train", "test"})
        if bad:
            raise ValueError(f"labelled CSV {path}: split must be train or test, got {bad}")
        is_test = [r["split"] == "test" for r in rows]
    else:
        g = torch.Generator().manual_seed(seed)
        n_test = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        held = set(torch.randperm(len(rows), generator=g)[:n_test].tolist())
        is_test = [i in held for i in range(len(rows))]
    ndim = len(input_size)
    pre = Preprocessor(config_for_input(modality, tuple(input_size), channels=channels))
    samples, targets, test = [], [], []
    for row, held_out in zip(rows, is_test):
        file = Path(row["file"]) if Path(row["file"]).is_absolute() else path.parent / row["file"]
        if not file.is_file():
            raise ValueError(f"labelled CSV {path}: file {row['file']} does not exist")
        try:
            cut = pre(file)
        except ReadError as e:
            raise ValueError(f"labelled CSV {path}: cannot read {row['file']}: {e.reason}") from None
        for sample in cut:
            samples.append(torch.from_numpy(sample.array))
            targets.append(classes.index(row["label"]))
            test.append(held_out)
    test_t = torch.tensor(test, dtype=torch.bool)
    if bool(test_t.all()) or not bool(test_t.any()):
        raise ValueError(
            f"labelled CSV {path}: the split leaves no {'training' if test_t.all() else 'test'} sample"
        )
    x = torch.stack(samples)
    if x.ndim != ndim + 2:
        raise ValueError(f"labelled CSV {path}: {modality} files give {x.ndim - 1}-D samples, not {ndim}-D")
    return LabelledSet(modality, path, classes, x, torch.tensor(targets), test_t)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    steps: int = 100,
) -> float:
    """Accuracy on ``test`` of a logistic regression fitted on standardised ``train`` features.

    ``train_x: (N, D)``, ``train_y: (N,)`` class indices; likewise for test.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 5, generator=g); y = (x[:, 0] > 0).long()
        >>> linear_probe(x[:30], y[:30], x[30:], y[30:], 2)
        1.0
    """
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    a, b = ((train_x - mean) / std).double(), ((test_x - mean) / std).double()
    head = nn.Linear(a.shape[1], num_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(a), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(b).argmax(1) == test_y).double().mean())


def probe_accuracy(
    model: nn.Module,
    labelled: LabelledSet,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    weight_decay: float = 1e-3,
) -> float:
    """Linear-probe test accuracy of the frozen ``model.embed`` features on ``labelled``."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = torch.cat(
                [model.embed(x.to(dev)).float().cpu() for x in labelled.samples.split(batch_size)]
            )
    finally:
        model.train(was_training)
    test = labelled.test
    return linear_probe(
        feats[~test], labelled.targets[~test], feats[test], labelled.targets[test], len(labelled.classes),
        weight_decay=weight_decay,
    )  # fmt: skip
