"""Linear-probe accuracy on frozen features: a labelled CSV, its samples, and a logistic regression.

The labelled format is a CSV file with a header and one row per scan (or per sample)::

    file,label,split
    scans/case01.nii.gz,tumour,train
    scans/case02.nii.gz,healthy,test

- ``file``: a NIfTI volume or a picture, relative to the CSV's folder (or absolute);
- ``label``: any text; the classes are the distinct labels;
- ``split`` (optional column): ``train`` or ``test``. Without it a seeded ``test_fraction`` of the
  files is held out (at least one file each side);
- ``sample`` (optional column): the index of one sample the preprocessing cuts from the file (a
  CT/MRI window, a pathology patch, in the cache's order); the row labels that sample only, and
  samples of the file without a row are left out. Empty: the row labels every sample of the file.

Every file goes through the modality's preprocessing at the model's input size
(:func:`invcoss.data.config_for_input`), and all samples cut from one file carry its split, so no
scan is on both sides. Without ``sample`` they carry its label too. :func:`write_labelled_csv`
writes the format; :func:`invcoss.data.phantoms.phantom_label_rows` gives the rows for phantoms
(their anatomy, per CT/MRI window).

The probe (:func:`linear_probe`) standardises the frozen ``model.embed`` features with the
training mean and standard deviation and fits a multinomial logistic regression with L2 penalty by
L-BFGS; the score is the accuracy on the test samples.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invcoss.data import Preprocessor, ReadError, config_for_input
from invcoss.data.atomic import atomic_write_bytes

__all__ = ["LabelledSet", "linear_probe", "probe_accuracy", "read_labelled_csv", "write_labelled_csv"]


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

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Samples per class on each side: ``{"train": {label: n}, "test": {label: n}}``."""
        out = {}
        for side, keep in (("train", ~self.test), ("test", self.test)):
            counts = torch.bincount(self.targets[keep], minlength=len(self.classes)).tolist()
            out[side] = dict(zip(self.classes, counts))
        return out


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
            unreadable file (named), a ``sample`` index the file does not have, or no training or
            no test sample.

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
    if "split" in header and any(r.get("split") for r in rows):
        bad = sorted({r.get("split", "") for r in rows} - {"train", "test"})
        if bad:
            raise ValueError(f"labelled CSV {path}: split must be train or test, got {bad}")
        is_test = [r["split"] == "test" for r in rows]
    else:
        # Held out by file, so the samples of one scan stay on one side.
        files = list(dict.fromkeys(r["file"] for r in rows))
        g = torch.Generator().manual_seed(seed)
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        held = {files[i] for i in torch.randperm(len(files), generator=g)[:n_test].tolist()}
        is_test = [r["file"] in held for r in rows]
    ndim = len(input_size)
    pre = Preprocessor(config_for_input(modality, tuple(input_size), channels=channels))
    samples, targets, test = [], [], []
    cuts: dict[Path, list] = {}  # one preprocessing per file when rows label its samples one by one
    for row, held_out in zip(rows, is_test):
        file = Path(row["file"]) if Path(row["file"]).is_absolute() else path.parent / row["file"]
        if file not in cuts:
            if not file.is_file():
                raise ValueError(f"labelled CSV {path}: file {row['file']} does not exist")
            try:
                cuts[file] = pre(file)
            except ReadError as e:
                raise ValueError(f"labelled CSV {path}: cannot read {row['file']}: {e.reason}") from None
        cut = cuts[file]
        if row.get("sample"):
            try:
                k = int(row["sample"])
            except ValueError:
                k = -1
            if not 0 <= k < len(cut):
                raise ValueError(
                    f"labelled CSV {path}: sample must be an index in 0..{len(cut) - 1} for {row['file']}, "
                    f"got {row['sample']!r}"
                )
            cut = cut[k : k + 1]
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


def write_labelled_csv(
    path: str | os.PathLike, rows: Iterable[tuple[str | os.PathLike, int | None, str, str | None]]
) -> Path:
    """Write a labelled CSV (module docstring) from ``(file, sample, label, split)`` rows, atomically.

    Files under the CSV's folder are written relative to it; ``sample`` or ``split`` None leaves
    the cell empty (every sample of the file; the seeded split).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> p = write_labelled_csv(d / "labels.csv", [(d / "a.png", None, "x", "train"), (d / "b.png", 0, "y", "test")])
        >>> p.read_text().splitlines()
        ['file,sample,label,split', 'a.png,,x,train', 'b.png,0,y,test']
    """
    path = Path(path)
    folder = path.parent.resolve()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "sample", "label", "split"])
    for file, sample, label, split in rows:
        file = Path(file)
        if file.resolve().is_relative_to(folder):
            file = file.resolve().relative_to(folder)
        w.writerow([file.as_posix(), "" if sample is None else int(sample), label, split or ""])
    return atomic_write_bytes(path, buf.getvalue().encode())


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
