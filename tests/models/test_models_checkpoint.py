"""Checkpoints are validated before a model is built: truncation, corrupt headers, edited or wrongly
typed configs, wrong dtypes; and the weights hash that binds statistics to a model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from invcoss.continual.replay import load_samples, save_samples
from invcoss.models import MAE, create_model
from invcoss.models.checkpoint import checkpoint_weights_hash, validate_checkpoint
from invcoss.models.weights import read_safetensors_header, weights_hash
from invcoss.pretrain import STATE_NAME, load_state, save_state

SMALL = {"img_size_2d": 32, "img_size_3d": (16, 32, 32)}


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    create_model("vit_nano", **SMALL).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    header = json.loads(path.read_text())
    header["config"].update(changes)
    path.write_text(json.dumps(header))


def _strip_config_metadata(folder) -> None:
    """The weights without the config copy in their metadata (as a checkpoint written elsewhere)."""
    path = folder / "model.safetensors"
    save_file(load_file(str(path)), str(path), {"format": "pt"})


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000, -1])
def test_a_truncated_weights_file_is_a_clear_error(ckpt, keep):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=r"model.safetensors is (truncated|corrupt)"):
        MAE.from_pretrained(ckpt)


def test_padded_or_corrupt_headers_are_clear_errors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 16)
    with pytest.raises(ValueError, match="truncated or padded"):
        MAE.from_pretrained(ckpt)
    path.write_bytes((10**15).to_bytes(8, "little") + data[8:])  # a header length of a petabyte
    with pytest.raises(ValueError, match="header length field says 1000000000000000 bytes"):
        MAE.from_pretrained(ckpt)
    length = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * length + data[8 + length :])
    with pytest.raises(ValueError, match="header is not JSON"):
        MAE.from_pretrained(ckpt)
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**6, 10**6]  # a shape its byte range cannot hold
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
    with pytest.raises(ValueError, match=f"tensor '{name}' .* does not fit its shape"):
        read_safetensors_header(path)


def test_config_errors_name_the_file_and_the_field(ckpt):
    good = (ckpt / "config.json").read_text()
    for changes, message in [
        ({"depth": "4"}, r"config.json: MAEConfig.depth expects int, got '4' \(str\)"),
        ({"mlp_ratio": "abc"}, r"MAEConfig.mlp_ratio expects float, got 'abc'"),
        ({"norm_pix_loss": 1}, r"MAEConfig.norm_pix_loss expects bool, got 1"),
        ({"img_size_2d": [32, "32"]}, r"MAEConfig.img_size_2d expects int \| tuple\[int, int\]"),
        ({"embed_dim": 97}, r"config.json: embed_dim/num_heads must divide evenly"),
        ({"widht": 96}, r"MAEConfig has no field\(s\) \['widht'\]"),
    ]:
        (ckpt / "config.json").write_text(good)
        _edit_config(ckpt, **changes)
        with pytest.raises(ValueError, match=message):
            MAE.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        MAE.from_pretrained(ckpt)
    (ckpt / "config.json").write_text('{"model_type": "MAE", "config": [1, 2]}')
    with pytest.raises(ValueError, match="not an invcoss checkpoint config"):
        MAE.from_pretrained(ckpt)


def test_an_edited_width_is_refused_before_the_model_is_allocated(ckpt):
    _edit_config(ckpt, embed_dim=96 * 64)
    with pytest.raises(ValueError, match="saved with a different config .* config.json was edited"):
        MAE.from_pretrained(ckpt)
    # Without the config copy in the weights, the shapes the config implies are compared with the
    # header on the meta device: a width that would need terabytes is refused, not allocated.
    _strip_config_metadata(ckpt)
    _edit_config(ckpt, embed_dim=96 * 4096)
    with pytest.raises(
        ValueError, match=r"checkpoint \(96, 96\), model \(393216, 393216\).*implies 2\d{7}\.\d MiB"
    ):
        MAE.from_pretrained(ckpt)


def test_derived_tables_and_dtypes_are_checked(ckpt):
    _strip_config_metadata(ckpt)
    good = (ckpt / "config.json").read_text()
    _edit_config(ckpt, img_size_3d=[16, 16 * 2000, 16 * 2000])  # 4M tokens of sin-cos tables
    with pytest.raises(ValueError, match=r"implies \d+\.\d GiB of derived tables"):
        MAE.from_pretrained(ckpt)
    (ckpt / "config.json").write_text(good)
    state = load_file(str(ckpt / "model.safetensors"))
    state["cls_token"] = state["cls_token"].to(torch.int32)
    save_file(state, str(ckpt / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match="wrong dtype for MAE: .*cls_token: checkpoint I32"):
        validate_checkpoint(ckpt, MAE)


def test_half_precision_weights_load_and_hash_as_loaded(ckpt, tmp_path):
    model = MAE.from_pretrained(ckpt)
    assert checkpoint_weights_hash(ckpt) == weights_hash(model)
    model.half().save_pretrained(tmp_path / "half")
    loaded = MAE.from_pretrained(tmp_path / "half")  # float32, values of the float16 file
    assert next(loaded.parameters()).dtype == torch.float32
    assert checkpoint_weights_hash(tmp_path / "half") == weights_hash(loaded) != weights_hash(model)


def test_a_training_state_is_checked_before_it_is_loaded(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_nano", **SMALL)
    save_state(tmp_path, model, torch.optim.AdamW(model.parameters()), 1, [0.5], {"model": {}})
    other = create_model("vit_nano", **SMALL, depth=2)
    with pytest.raises(
        ValueError, match=r"not a training state of this model \(parameters that differ: \['blocks.2"
    ):
        load_state(tmp_path, other, torch.optim.AdamW(other.parameters()), torch.device("cpu"))
    path = tmp_path / STATE_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="training_state.safetensors is truncated"):
        load_state(tmp_path, model, torch.optim.AdamW(model.parameters()), torch.device("cpu"))


def test_a_truncated_replay_buffer_is_named(tmp_path):
    path = save_samples(tmp_path / "buffer.safetensors", torch.rand(3, 1, 4, 4), {"modality": "ct"})
    assert load_samples(path)[1] == {"modality": "ct"}
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="buffer.safetensors is truncated"):
        load_samples(path)
