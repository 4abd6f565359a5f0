"""Public ViT / MAE weights (timm, facebookresearch/mae) converted into the project's :class:`MAE`.

:func:`convert_timm_state` turns a timm ``VisionTransformer`` state dict, or a facebookresearch/mae
checkpoint (``{"model": ...}``, with or without its decoder), into an :class:`MAEConfig` and a
state dict of :class:`~invcoss.models.MAE`; :meth:`MAE.from_timm` builds the model from it. What
is done to the weights:

* **Key mapping.** The encoder blocks are timm ``Block`` s in both (``blocks.i.norm1``,
  ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) and keep their names;
  ``patch_embed.proj`` becomes ``patch_embed.2d.proj``, ``norm`` stays ``norm``. An MAE decoder
  (``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) goes
  to the 2D decoder.
* **Position table.** The project's MAE adds a fixed sin-cos table, rebuilt from the config, not a
  stored one. The checkpoint's ``pos_embed`` must be such a table: it is compared with the table of
  each order of :data:`~invcoss.models.pos_embed.POS_EMBED_ORDERS` and the one it matches becomes
  the config's ``pos_embed_order`` (``"mae"`` for public MAE weights). A learned table (supervised
  ViTs) matches neither and is refused. The class token's row (zero in MAE) is added to the class
  token, which is what timm does with it on every forward.
* **3D.** The 2D patch embedding is inflated over depth: its kernel ``(D, C, ph, pw)`` is summed
  over the colour channels (a grey image repeated in 3 channels gives the same tokens as the grey
  image with the summed kernel), repeated over the ``pd`` slices of a 3D patch and divided by
  ``pd``, so a volume constant along depth gives the token of its slice in 2D. The bias is copied.
  The 3D patch must be ``pd x ph x pw`` with the 2D patch's ``ph x pw``.
* **Freshly initialised**: whatever the checkpoint does not hold: the 3D decoder embedding and
  head always, the whole decoder when the checkpoint has none (a timm encoder). The report lists
  them.

The licence of a named timm checkpoint is read from timm's pretrained config (MAE's weights are
CC-BY-NC-4.0: non-commercial use only).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from invcoss.models.hub import hub_download
from invcoss.models.mae_config import MAEConfig
from invcoss.models.pos_embed import POS_EMBED_ORDERS, sincos_pos_embed

__all__ = [
    "ConversionReport",
    "PublicWeights",
    "convert_timm_state",
    "inflate_patch_kernel",
    "read_public_weights",
    "with_fresh",
]

# The largest difference between a stored sin-cos table and the rebuilt one that still counts as
# the same table: float32 rounding of values in [-1, 1] is below 1e-7; a learned table is far off.
TABLE_TOLERANCE = 1.0e-5
_ENCODER_BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip


@dataclass
class ConversionReport:
    """What a conversion did: the source, the table order found, the keys loaded, fresh and unused."""

    source: str
    pos_embed_order: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    licence: str | None = None

    def summary(self) -> str:
        """A few lines for the user: what was loaded, what is freshly initialised, the licence."""
        fresh_groups = sorted({_group(k) for k in self.fresh})
        lines = [
            f"loaded {len(self.loaded)} tensors from {self.source} "
            f"(sin-cos position table in the {self.pos_embed_order!r} order)",
            "freshly initialised (train before use): "
            + (", ".join(fresh_groups) if fresh_groups else "nothing"),
        ]
        if self.ignored:
            lines.append(f"not used: {', '.join(sorted({_group(k) for k in self.ignored}))}")
        lines.append(f"licence of these weights: {self.licence or 'unknown, check the source'}")
        return "\n".join(lines)


def _group(key: str) -> str:
    # "decoder_blocks.3.mlp.fc1.weight" -> "decoder_blocks"; "decoder_pred.3d.weight" -> "decoder_pred.3d"
    parts = key.split(".")
    if len(parts) > 1 and parts[1] in ("2d", "3d"):
        return ".".join(parts[:2])
    return parts[0]


def inflate_patch_kernel(weight: torch.Tensor, depth: int, in_chans: int) -> torch.Tensor:
    """A 2D patch kernel ``(D, C, ph, pw)`` inflated to 3D ``(D, in_chans, depth, ph, pw)``.

    With ``in_chans == 1`` the colour channels are summed first; otherwise ``in_chans`` must equal
    ``C``. The kernel is repeated over ``depth`` slices and divided by ``depth``, so a volume that is
    constant along depth gives the 2D response of its slice.

    Example:
        >>> w = torch.randn(4, 3, 2, 2)
        >>> x = torch.randn(1, 1, 2, 2)
        >>> w3 = inflate_patch_kernel(w, 5, 1)
        >>> y2 = torch.nn.functional.conv2d(x.expand(1, 3, 2, 2), w)
        >>> y3 = torch.nn.functional.conv3d(x[:, :, None].expand(1, 1, 5, 2, 2), w3)
        >>> torch.allclose(y2.flatten(), y3.flatten(), atol=1e-5)
        True
    """
    if weight.ndim != 4:
        raise ValueError(f"inflate_patch_kernel expects weight (D, C, ph, pw), got {tuple(weight.shape)}")
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif in_chans != weight.shape[1]:
        raise ValueError(
            f"cannot inflate a {weight.shape[1]}-channel patch embedding to {in_chans} channels "
            f"(in_chans_3d must be 1 or {weight.shape[1]})"
        )
    return weight[:, :, None].repeat(1, 1, depth, 1, 1) / depth  # (D, C3, pd, ph, pw)


def _unwrap(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):  # facebookresearch/mae and training scripts wrap the weights
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _table_order(stored: torch.Tensor, grid: tuple[int, int], what: str) -> str:
    diffs = {}
    for order in POS_EMBED_ORDERS:
        diffs[order] = (stored.float() - sincos_pos_embed(grid, stored.shape[-1], order)).abs().max().item()
        if diffs[order] <= TABLE_TOLERANCE:
            return order
    raise ValueError(
        f"the checkpoint's {what} is not a fixed sin-cos table of the {grid} grid (largest difference "
        f"to each order: {', '.join(f'{o} {d:.3g}' for o, d in diffs.items())}); the project's MAE "
        "uses fixed tables, so weights trained with a learned position table cannot be loaded"
    )


def _pos_table(pos: torch.Tensor, num_patches: int, what: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(class row or None, patch rows (N, D))`` of a stored ``(1, [1 +] N, D)`` table."""
    rows = pos.reshape(-1, pos.shape[-1])
    if rows.shape[0] == num_patches + 1:
        return rows[:1], rows[1:]
    if rows.shape[0] == num_patches:
        return None, rows
    raise ValueError(f"the checkpoint's {what} has {rows.shape[0]} rows for {num_patches} patches")


def convert_timm_state(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    decoder: tuple[int, int, int] = (512, 8, 16),
    decoder_num_heads: int | None = None,
    img_size_3d: tuple[int, int, int] | None = None,
    patch_depth: int | None = None,
    in_chans_3d: int = 1,
    name: str = "timm",
    source: str = "state dict",
) -> tuple[MAEConfig, dict[str, torch.Tensor], ConversionReport]:
    """The :class:`MAEConfig` and :class:`MAE` state dict of a timm ViT / MAE checkpoint.

    Args:
        state: a timm ``VisionTransformer`` state dict or a facebookresearch/mae checkpoint.
        num_heads: attention heads of the encoder; not stored in the weights. Default
            ``embed_dim // 64`` (the head width of ViT-Ti/S/B/L in timm and MAE).
        decoder: ``(width, depth, heads)`` of a decoder built fresh when the checkpoint has none
            (default MAE's 512 / 8 / 16).
        decoder_num_heads: heads of a decoder the checkpoint holds; default its width // 32 (MAE's).
        img_size_3d: volume size; default ``(patch_depth, 12 * ph, 12 * pw)`` (144 tokens).
        patch_depth: slices of one 3D patch; default the 2D patch height.
        in_chans_3d: channels of a volume (1: the RGB kernel is summed, see the module docstring).
        name: the config's ``name``.
        source: what the weights are, for the report.

    Returns:
        ``(config, state dict with the keys the checkpoint provides, report)``; the report's
        ``fresh`` lists the model's keys left to the caller's initialisation.

    Raises:
        ValueError: not a ViT with a class token, a learned position table, a layer the project's
            MAE does not have (layer scale, no qkv bias), or inconsistent shapes.
    """
    src = _unwrap(state)
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in needed if k not in src]
    if missing:
        raise ValueError(
            f"{source} is not a ViT/MAE checkpoint with a class token: missing {missing} "
            f"(found e.g. {sorted(src)[:5]})"
        )
    kernel = src["patch_embed.proj.weight"]  # (D, C, ph, pw)
    embed_dim, in_chans, ph, pw = kernel.shape
    depth = 1 + max((int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise ValueError(f"{source} has no encoder blocks (blocks.0...)")
    unsupported = sorted(k for k in src if re.match(r"blocks\.\d+\.(ls\d|attn\.[qk]_norm)", k))
    if unsupported:
        raise ValueError(f"{source} uses layers the project's MAE does not have: {unsupported[:4]}")
    rows = src["pos_embed"].numel() // embed_dim
    side = round(rows**0.5)
    if side * side != rows:  # a class row first
        side = round((rows - 1) ** 0.5)
    num_patches = side * side
    if num_patches not in (rows, rows - 1):
        raise ValueError(f"{source}'s pos_embed has {rows} rows, not a square grid (with a class row)")
    cls_row, table = _pos_table(src["pos_embed"], num_patches, "pos_embed")
    order = _table_order(table, (side, side), "pos_embed")

    has_decoder = "decoder_embed.weight" in src
    if has_decoder:
        dec_width = src["decoder_embed.weight"].shape[0]
        dec_depth = 1 + max(int(m.group(1)) for k in src if (m := re.match(r"decoder_blocks\.(\d+)\.", k)))
        dec_heads = decoder_num_heads or max(1, dec_width // 32)
    else:
        dec_width, dec_depth, dec_heads = decoder
    pd = patch_depth or ph
    config = MAEConfig(
        name=name,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or max(1, embed_dim // 64),
        decoder_embed_dim=dec_width,
        decoder_depth=dec_depth,
        decoder_num_heads=dec_heads,
        mlp_ratio=src["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        img_size_2d=(side * ph, side * pw),
        patch_size_2d=(ph, pw),
        in_chans_2d=in_chans,
        img_size_3d=img_size_3d or (pd, 12 * ph, 12 * pw),
        patch_size_3d=(pd, ph, pw),
        in_chans_3d=in_chans_3d,
        pos_embed_order=order,
    )

    out: dict[str, torch.Tensor] = {}
    cls = src["cls_token"].reshape(1, 1, embed_dim)
    out["cls_token"] = cls if cls_row is None else cls + cls_row.reshape(1, 1, embed_dim)
    out["patch_embed.2d.proj.weight"] = kernel
    out["patch_embed.2d.proj.bias"] = src["patch_embed.proj.bias"]
    out["patch_embed.3d.proj.weight"] = inflate_patch_kernel(kernel, pd, in_chans_3d)
    out["patch_embed.3d.proj.bias"] = src["patch_embed.proj.bias"].clone()
    for i in range(depth):
        for k in _ENCODER_BLOCK_KEYS:
            if f"blocks.{i}.{k}" not in src:
                raise ValueError(f"{source} has no blocks.{i}.{k} (the project's MAE needs it)")
            out[f"blocks.{i}.{k}"] = src[f"blocks.{i}.{k}"]
    out["norm.weight"], out["norm.bias"] = src["norm.weight"], src["norm.bias"]
    if has_decoder:
        dec_cls, dec_table = _pos_table(src["decoder_pos_embed"], num_patches, "decoder_pos_embed")
        if _table_order(dec_table, (side, side), "decoder_pos_embed") != order:
            raise ValueError(f"{source}'s encoder and decoder position tables use different orders")
        if dec_cls is not None and dec_cls.abs().max() > 0:
            raise ValueError(f"{source}'s decoder_pos_embed has a non-zero class row, which MAE never has")
        out["mask_token"] = src["mask_token"]
        for k in ("weight", "bias"):
            out[f"decoder_embed.2d.{k}"] = src[f"decoder_embed.{k}"]
            out[f"decoder_pred.2d.{k}"] = src[f"decoder_pred.{k}"]
            out[f"decoder_norm.{k}"] = src[f"decoder_norm.{k}"]
        out.update({k: v for k, v in src.items() if k.startswith("decoder_blocks.")})
    used = set(out) | {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "decoder_pos_embed"}
    used |= {f"decoder_{p}.{k}" for p in ("embed", "pred", "norm") for k in ("weight", "bias")}
    report = ConversionReport(
        source=source,
        pos_embed_order=order,
        loaded=sorted(out),
        ignored=sorted(k for k in src if k not in used),
    )
    return config, {k: v.detach().float().contiguous() for k, v in out.items()}, report


def with_fresh(report: ConversionReport, model_keys: list[str]) -> ConversionReport:
    """The report with ``fresh`` set to the model keys the conversion did not provide."""
    return dataclasses.replace(report, fresh=sorted(set(model_keys) - set(report.loaded)))


@dataclass
class PublicWeights:
    """A checkpoint read by :func:`read_public_weights`: the state dict and what is known of it."""

    state: dict[str, torch.Tensor]
    source: str
    num_heads: int | None = None
    licence: str | None = None
    name: str = "timm"


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: tensors and plain containers only, never arbitrary pickled objects
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors, which are not unpickled for safety ({e}); "
            "save its state dict alone (torch.save(ckpt['model'], ...)) or as safetensors"
        ) from None


def read_public_weights(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> PublicWeights:
    """Read a ViT/MAE checkpoint from a state dict, a timm model, a file or timm's cache.

    Args:
        source: a state dict; a timm ``VisionTransformer``; a ``.safetensors`` / ``.pth`` file (a
            facebookresearch/mae checkpoint is a ``.pth``); a folder holding ``model.safetensors``;
            or a timm pretrained name such as ``"vit_base_patch16_224.mae"``, read from the
            Hugging Face cache timm downloads into (:func:`invcoss.models.hub.hub_download`).
        cache_dir: the Hub cache to read instead of the default.
        allow_download: let a timm name be downloaded when it is not cached.

    Raises:
        FileNotFoundError: a path that does not exist, or a timm name that is not cached.
        ValueError: a string that is neither a path nor a timm pretrained name.
    """
    if isinstance(source, torch.nn.Module):
        heads = getattr(getattr(getattr(source, "blocks", [None])[0], "attn", None), "num_heads", None)
        return PublicWeights(dict(source.state_dict()), f"a {type(source).__name__}", heads)
    if isinstance(source, Mapping):
        return PublicWeights(dict(source), "a state dict")
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.exists():
        return PublicWeights(_read_file(path), str(path))
    name = str(source)
    if os.sep in name or name.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"MAE.from_timm: no such checkpoint file {path}")
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if "." in name else None
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"MAE.from_timm: {name!r} is neither a file nor a timm pretrained name with Hub weights "
            "(e.g. 'vit_base_patch16_224.mae')"
        )
    repo = cfg.hf_hub_id if cfg.hf_hub_id != "timm/" else f"timm/{name}"
    path = hub_download(repo, cfg.hf_hub_filename or "model.safetensors", cache_dir, allow_download)
    with torch.device("meta"):  # the architecture only: allocates nothing
        heads = timm.create_model(name.split(".")[0], pretrained=False).blocks[0].attn.num_heads
    return PublicWeights(_read_file(path), f"timm {name} ({path})", heads, cfg.license, name)
