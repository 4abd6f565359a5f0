"""collect_feature_stats against float64 statistics of all features at once; the file and its checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from invcoss.data import preprocess, write_phantoms
from invcoss.data.datasets import CachedDataset
from invcoss.feature_stats import (
    FeatureStats,
    SmallCohortWarning,
    collect_feature_stats,
    config_hash,
    load_feature_stats,
    save_feature_stats,
)
from invcoss.models import create_model
from invcoss.models.weights import weights_hash

SMALL = {"img_size_2d": 32, "img_size_3d": (16, 32, 32)}  # 4 patches + class token in 2D and 3D


def small_model(**kw):
    torch.manual_seed(0)
    return create_model("vit_nano", **(SMALL | kw))


def reference_stats(model, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mean and biased variance over the batch of every block's output, all samples in one pass, float64."""
    model.eval()
    with torch.no_grad():
        feats = [f.double() for f in model.block_features(x.to(next(model.parameters()).dtype))]
    return [f.mean(0) for f in feats], [f.var(0, unbiased=False) for f in feats]


def samples(ndim: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(ndim)
    if ndim == 2:
        return torch.rand(n, 3, 32, 32, generator=g)
    return torch.rand(n, 1, 16, 32, 32, generator=g) * 2 - 1


@pytest.mark.parametrize("ndim", [2, 3])
def test_streaming_equals_all_at_once_float64(ndim):
    model = small_model().double()
    x = samples(ndim, 11)
    stats = collect_feature_stats(model, x, modality="ct", batch_size=4, store_dtype=torch.float64)  # 4, 4, 3
    ref_mean, ref_var = reference_stats(model, x)
    assert stats.count == 11 and stats.num_layers == model.config.depth == len(ref_mean)
    for m, v, rm, rv in zip(stats.mean, stats.var, ref_mean, ref_var):
        assert m.shape == rm.shape == (5, model.config.embed_dim) and m.dtype == torch.float64
        torch.testing.assert_close(m, rm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_streaming_float32_model_over_uneven_batches(ndim):
    model = small_model()
    x = samples(ndim, 13)
    batches = [x[:5], x[5:6], x[6:13]]  # mixed batch sizes, fed as an iterable
    stats = collect_feature_stats(model, batches, modality="xray" if ndim == 2 else "mri")
    ref_mean, ref_var = reference_stats(model, x)
    assert stats.count == 13 and stats.mean[0].dtype == torch.float32
    for m, v, rm, rv in zip(stats.mean, stats.var, ref_mean, ref_var):
        torch.testing.assert_close(m.double(), rm, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v.double(), rv, rtol=1e-4, atol=1e-5)
    assert stats.input_size == ((32, 32) if ndim == 2 else (16, 32, 32))


def test_mode_is_restored_and_no_grad():
    model = small_model()
    model.train()
    collect_feature_stats(model, samples(2, 3), modality="xray")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_save_load_roundtrip(tmp_path):
    model = small_model()
    path = tmp_path / "stats.safetensors"
    stats = collect_feature_stats(model, samples(3, 6), modality="ct", out=path)
    loaded = load_feature_stats(path, model, modality="ct")
    assert isinstance(loaded, FeatureStats)
    assert (loaded.preset, loaded.modality, loaded.count, loaded.dtype) == ("vit_nano", "ct", 6, "float32")
    assert loaded.input_size == (16, 32, 32) and loaded.config_hash == config_hash(model.config)
    assert loaded.config["embed_dim"] == model.config.embed_dim
    for a, b in zip(stats.mean + stats.var, loaded.mean + loaded.var):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # safetensors: an 8-byte header length, the JSON header, then the tensors and nothing else.
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + loaded.nbytes


def test_statistics_are_bound_to_the_weights_they_were_collected_with(tmp_path):
    model = small_model()
    path = tmp_path / "stats.safetensors"
    stats = collect_feature_stats(model, samples(3, 4), modality="ct", out=path)
    assert stats.weights_hash == weights_hash(model) == load_feature_stats(path, model).weights_hash
    assert len(stats.weights_hash) == 64
    torch.manual_seed(1)
    other = create_model("vit_nano", **SMALL)  # the same architecture, other weights
    mine, theirs = stats.weights_hash[:16], weights_hash(other)[:16]
    assert mine != theirs
    with pytest.raises(
        ValueError, match=f"collected with weights {mine}, but the model's weights are {theirs}"
    ):
        load_feature_stats(path, other, modality="ct")
    with pytest.warns(UserWarning, match=f"weights {mine}, but the model's weights are {theirs}.*anyway"):
        assert load_feature_stats(path, other, allow_other_weights=True).count == 4
    # The continual run inverts a later model with an earlier stage's statistics: the weights they
    # must record are then named explicitly, and any other hash is still refused.
    assert load_feature_stats(path, other, expect_weights=stats.weights_hash).count == 4
    with pytest.raises(ValueError, match=f"but the model's weights are {theirs}"):
        load_feature_stats(path, model, expect_weights=weights_hash(other))
    # One changed value, or a cast, is other weights.
    with torch.no_grad():
        model.cls_token.add_(1e-6)
    with pytest.raises(ValueError, match="collected with weights"):
        load_feature_stats(path, model)
    # A file that records no weights hash is refused the same way.
    save_feature_stats(dataclasses.replace(stats, weights_hash=None), path)
    with pytest.raises(ValueError, match="unknown weights .*records no weights hash"):
        load_feature_stats(path, small_model())


def test_mismatches_are_clear(tmp_path):
    model = small_model()
    path = tmp_path / "stats.safetensors"
    collect_feature_stats(model, samples(2, 4), modality="xray", out=path)
    with pytest.raises(ValueError, match=r"input \(32, 32\).*the model is vit_nano .*input \(112, 112\)"):
        load_feature_stats(path, create_model("vit_nano"))
    with pytest.raises(ValueError, match="collected with vit_nano .* but the model is vit_tiny"):
        load_feature_stats(path, create_model("vit_tiny", **SMALL))
    with pytest.raises(ValueError, match="are for xray, not ct"):
        load_feature_stats(path, model, modality="ct")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an invcoss feature statistics file"):
        load_feature_stats(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="cannot read feature statistics"):
        load_feature_stats(junk)


def test_wrong_input_size_and_missing_modality():
    model = small_model()
    with pytest.raises(
        ValueError, match=r"samples of shape \(3, 64, 64\), but model vit_nano expects \(3, 32, 32\)"
    ):
        collect_feature_stats(model, [torch.rand(2, 3, 64, 64)], modality="xray")
    with pytest.raises(ValueError, match="needs the modality"):
        collect_feature_stats(model, [torch.rand(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="no data"):
        collect_feature_stats(model, [], modality="xray")


def test_over_a_cached_dataset(tmp_path):
    write_phantoms(tmp_path / "src", "xray", 3, size=(64, 64))
    preprocess(tmp_path / "src", tmp_path / "cache", "xray", "quick", config=None)
    ds = CachedDataset(tmp_path / "cache")
    torch.manual_seed(0)
    model = create_model("vit_nano").double()
    with pytest.warns(SmallCohortWarning, match="3 source files"):
        stats = collect_feature_stats(model, ds, batch_size=2, store_dtype=torch.float64)
    assert stats.modality == "xray" and stats.count == 3 and stats.input_size == (112, 112)
    assert stats.sources == 3  # the cache's distinct source files
    ref_mean, ref_var = reference_stats(model, torch.stack([ds[i] for i in range(3)]))
    torch.testing.assert_close(stats.mean[-1], ref_mean[-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.var[-1], ref_var[-1], rtol=1e-10, atol=1e-12)
