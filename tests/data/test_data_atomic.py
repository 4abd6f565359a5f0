"""Safetensors output: the same tensors and metadata give the same bytes, loadable as before."""

import torch
from safetensors.torch import load, safe_open, save

from invcoss.data.atomic import atomic_write_safetensors, canonical_safetensors

META = {f"key{i}": str(i) for i in range(12)}


def test_the_same_content_gives_the_same_bytes(tmp_path):
    tensors = {
        "b": torch.arange(5.0),
        "a": torch.ones(3, 2, dtype=torch.float64),
        "c": torch.zeros(7, dtype=torch.int8),
    }
    raws = {save(tensors, metadata=META) for _ in range(8)}
    assert len(raws) > 1  # the plain writer orders its metadata differently from call to call
    canon = {canonical_safetensors(r) for r in raws}
    assert len(canon) == 1
    (raw,) = canon
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # the data stays 8-byte aligned
    back = load(raw)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    first = atomic_write_safetensors(tmp_path / "one.safetensors", tensors, META).read_bytes()
    second = atomic_write_safetensors(tmp_path / "two.safetensors", tensors, dict(reversed(META.items())))
    assert second.read_bytes() == first == raw
    with safe_open(str(second), "pt") as f:
        assert f.metadata() == META


def test_a_file_without_metadata_keeps_its_tensors():
    raw = canonical_safetensors(save({"x": torch.arange(3)}))
    assert load(raw)["x"].tolist() == [0, 1, 2]
