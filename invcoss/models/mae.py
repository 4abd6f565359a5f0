"""A dimension-free ViT masked autoencoder (He et al.) for 2D images and 3D volumes (Appendix C).

One model holds two tokenizers and shares everything else, as the paper's dimension-free backbone:

* per dimensionality (``"2d"`` / ``"3d"`` in the module dicts): the patch embedding, the fixed sin-cos
  position tables of encoder and decoder, the decoder embedding (encoder width → decoder width) and
  the decoder head (decoder width → pixels of one patch);
* shared: the class token, the encoder's timm ``Block`` stack and final norm, the mask token, the
  decoder's ``Block`` stack and norm.

The dimensionality of a call is read from the input: ``(B, C, H, W)`` is 2D, ``(B, C, D, H, W)``
3D. Input sizes are part of :class:`MAEConfig`; the defaults are the paper's (224x224 3-channel
images in [0, 1], 16x192x192 1-channel volumes, patch 16: 196 and 144 tokens).

Token layout: the class token first, then the patches in raster order (last axis fastest).
``block_features`` returns the class token too (``L = 1 + num_patches``: 197 / 145 at the paper's
sizes); ``embed`` averages the normed patch tokens only.

Example:
    >>> import torch
    >>> m = create_model("vit_nano", img_size_2d=32, img_size_3d=(16, 32, 32))
    >>> loss, pred, mask = m(torch.rand(2, 3, 32, 32))
    >>> tuple(pred.shape), tuple(mask.shape), int(mask.sum())
    ((2, 4, 768), (2, 4), 6)
    >>> loss, pred, mask = m(torch.rand(2, 1, 16, 32, 32) * 2 - 1)
    >>> tuple(pred.shape)
    (2, 4, 4096)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from invcoss.models.checkpoint import PretrainedMixin
from invcoss.models.mae_config import MAEConfig, preset_config
from invcoss.models.pos_embed import SinCosPosEmbed
from invcoss.models.public_weights import convert_timm_state, read_public_weights, with_fresh

logger = logging.getLogger(__name__)

__all__ = ["MAE", "PatchEmbed3d", "create_model"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _transformer(width: int, heads: int, depth: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm) for _ in range(depth)
    )


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patches to tokens: ``(B, C, D, H, W)`` → ``(B, N, embed_dim)``."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class MAE(PretrainedMixin, nn.Module):
    """Masked autoencoder with 2D and 3D tokenizers over shared timm transformer blocks.

    Args:
        config: the architecture and input sizes; :func:`create_model` builds one from a preset.

    Raises:
        TypeError: ``config`` is not an :class:`MAEConfig`.

    Example:
        >>> cfg = MAEConfig(embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=24, decoder_depth=1,
        ...                 decoder_num_heads=2, img_size_2d=32, img_size_3d=(16, 32, 32))
        >>> m = MAE(cfg)
        >>> [tuple(f.shape) for f in m.block_features(torch.rand(2, 1, 16, 32, 32))]
        [(2, 5, 48), (2, 5, 48)]
    """

    config_class = MAEConfig

    def __init__(self, config: MAEConfig) -> None:
        if not isinstance(config, MAEConfig):
            raise TypeError(f"MAE expects an MAEConfig (see create_model), got {type(config).__name__}")
        super().__init__()
        self.config = cfg = config
        dims = (2, 3)
        self.patch_embed = nn.ModuleDict(
            {
                "2d": PatchEmbed(cfg.img_size_2d, cfg.patch_size_2d, cfg.in_chans_2d, cfg.embed_dim),
                "3d": PatchEmbed3d(cfg.patch_size_3d, cfg.in_chans_3d, cfg.embed_dim),
            }
        )
        self.pos_embed = nn.ModuleDict(
            {f"{n}d": SinCosPosEmbed(cfg.grid(n), cfg.embed_dim, cfg.pos_embed_order) for n in dims}
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.blocks = _transformer(cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.mlp_ratio)
        self.norm = _LayerNorm(cfg.embed_dim)

        self.decoder_embed = nn.ModuleDict(
            {f"{n}d": nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim) for n in dims}
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.ModuleDict(
            {f"{n}d": SinCosPosEmbed(cfg.grid(n), cfg.decoder_embed_dim, cfg.pos_embed_order) for n in dims}
        )
        self.decoder_blocks = _transformer(
            cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.decoder_depth, cfg.mlp_ratio
        )
        self.decoder_norm = _LayerNorm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.ModuleDict(
            {f"{n}d": nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim(n)) for n in dims}
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # As facebookresearch/mae: patch projections like a linear layer, tokens N(0, 0.02).
        for embed in self.patch_embed.values():
            w = embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, config: MAEConfig) -> MAE:
        return cls(config)

    @classmethod
    def from_timm(
        cls,
        source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
        *,
        num_heads: int | None = None,
        img_size_3d: tuple[int, int, int] | None = None,
        patch_depth: int | None = None,
        in_chans_3d: int = 1,
        cache_dir: str | os.PathLike | None = None,
        allow_download: bool = False,
        verbose: bool = True,
    ) -> MAE:
        """An MAE holding public timm ViT / MAE weights (see :mod:`invcoss.models.public_weights`).

        Nothing is downloaded unless ``allow_download``: a timm name is read from the Hugging Face
        cache. The model's position tables take the order the weights were trained with (``"mae"``
        for MAE's weights, recorded in ``config.pos_embed_order``); the 3D patch embedding is the 2D
        one inflated over depth; what the checkpoint does not hold (the decoder of a timm encoder,
        the 3D decoder head) is freshly initialised and listed in the summary logged (WARNING, on
        the ``invcoss.models.mae`` logger) with the weights' licence when known (``verbose``), also
        kept as ``model.conversion``.

        Args:
            source: a timm name (``"vit_base_patch16_224.mae"``), a ``.safetensors`` / ``.pth``
                file or a folder with ``model.safetensors``, a state dict, or a timm model.
            num_heads: encoder heads when the source does not tell (default ``embed_dim // 64``).
            img_size_3d, patch_depth, in_chans_3d: the 3D tokenizer (default 1 channel, patches
                as deep as they are high, 12 x 12 patches per slab).
            cache_dir: a Hub cache other than the default; allow_download: fetch what is not cached.

        Raises:
            FileNotFoundError: no such file, or a timm name that is not cached.
            ValueError: weights the project's MAE cannot hold (learned position table, layer scale).

        Example:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
            >>> from invcoss.models.pos_embed import sincos_pos_embed
            >>> with torch.no_grad():
            ...     vit.pos_embed[0, 1:] = sincos_pos_embed((2, 2), 192, "mae"); vit.pos_embed[0, 0] = 0
            >>> m = MAE.from_timm(vit, verbose=False)
            >>> m.config.pos_embed_order, m.config.depth, m.conversion.fresh[:1]
            ('mae', 2, ['decoder_blocks.0.attn.proj.bias'])
        """
        weights = read_public_weights(source, cache_dir, allow_download)
        config, state, report = convert_timm_state(
            weights.state,
            num_heads=num_heads or weights.num_heads,
            img_size_3d=img_size_3d,
            patch_depth=patch_depth,
            in_chans_3d=in_chans_3d,
            name=weights.name,
            source=weights.source,
        )
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream where it was
            model = cls(config)
        own = model.state_dict()
        shapes = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if v.shape != own[k].shape
        ]
        if shapes:
            raise ValueError(f"{weights.source} does not fit the MAE it describes: {shapes[:4]}")
        model.load_state_dict(state, strict=False)
        model.conversion = with_fresh(report, list(own))
        model.conversion.licence = weights.licence
        if verbose:
            logger.warning("%s", model.conversion.summary())
        return model

    @classmethod
    def _resolve_expected(cls, expect: MAEConfig | str) -> MAEConfig:
        return preset_config(expect) if isinstance(expect, str) else super()._resolve_expected(expect)

    # -- input checks (public boundary) --------------------------------------------------------
    def _check_input(self, x: torch.Tensor, method: str) -> int:
        if x.ndim not in (4, 5):
            raise ValueError(
                f"MAE.{method} expects x of shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}"
            )
        ndim = x.ndim - 2
        expected = (self.config.in_chans(ndim), *self.config.img_size(ndim))
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MAE.{method} expects {ndim}D input of shape (B, {', '.join(map(str, expected))}) "
                f"for this model ({self.config.name}), got {tuple(x.shape)}"
            )
        return ndim

    # -- patches -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` → ``(B, L, prod(patch) * C)``, patch pixels first and channels last."""
        ndim = self._check_input(x, "patchify")
        grid, patch = self.config.grid(ndim), self.config.patch_size(ndim)
        split = [s for g, p in zip(grid, patch) for s in (g, p)]
        x = x.reshape(x.shape[0], x.shape[1], *split)  # (B, C, g1, p1, ..., gn, pn)
        order = [0, *range(2, 2 + 2 * ndim, 2), *range(3, 3 + 2 * ndim, 2), 1]
        return x.permute(order).reshape(x.shape[0], math.prod(grid), -1)

    def unpatchify(self, patches: torch.Tensor, ndim: int) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``(B, L, prod(patch) * C)`` → ``(B, C, *S)``."""
        if ndim not in (2, 3):
            raise ValueError(f"MAE.unpatchify expects ndim 2 or 3, got {ndim}")
        grid, patch, chans = self.config.grid(ndim), self.config.patch_size(ndim), self.config.in_chans(ndim)
        expected = (self.config.num_patches(ndim), self.config.patch_dim(ndim))
        if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
            raise ValueError(
                f"MAE.unpatchify expects patches of shape (B, {expected[0]}, {expected[1]}) for ndim={ndim}, "
                f"got {tuple(patches.shape)}"
            )
        x = patches.reshape(patches.shape[0], *grid, *patch, chans)  # (B, g1..gn, p1..pn, C)
        order = [0, 2 * ndim + 1, *(a for i in range(ndim) for a in (1 + i, 1 + ndim + i))]
        size = [g * p for g, p in zip(grid, patch)]
        return x.permute(order).reshape(patches.shape[0], chans, *size)

    # -- encoder / decoder ---------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        key = f"{ndim}d"
        return self.pos_embed[key](self.patch_embed[key](x))  # (B, L, D)

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    @staticmethod
    def random_masking(
        tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the ``int(L * (1 - mask_ratio))`` tokens with the lowest noise.

        Returns ``(kept (B, K, D), mask (B, L) float32 with 1 = masked, ids_restore (B, L))``.
        """
        B, L, D = tokens.shape
        keep = int(L * (1 - mask_ratio))
        noise = torch.rand(B, L, device=tokens.device) if noise is None else noise.to(tokens.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=tokens.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(
        self, x: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Args:
            x: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` at the configured size.
            mask_ratio: fraction of patches to hide, in [0, 1).
            noise: optional ``(B, L)`` per-patch scores deciding the mask (lowest kept), so that two
                models or two calls can hide the same patches (distillation on the same tokens).

        Returns:
            ``latent (B, 1 + K, D)`` normed, class token first; ``mask (B, L)`` (1 = masked);
            ``ids_restore (B, L)``.
        """
        ndim = self._check_input(x, "forward_encoder")
        self._check_masking(x, ndim, mask_ratio, noise)
        return self._encode_masked(self._tokens(x, ndim), mask_ratio, noise)

    def _check_masking(
        self, x: torch.Tensor, ndim: int, mask_ratio: float, noise: torch.Tensor | None
    ) -> None:
        L = self.config.num_patches(ndim)
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if noise is not None and tuple(noise.shape) != (x.shape[0], L):
            raise ValueError(f"noise must have shape ({x.shape[0]}, {L}), got {tuple(noise.shape)}")

    def _encode_masked(
        self, tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kept, mask, ids_restore = self.random_masking(tokens, mask_ratio, noise)  # (B, K, D)
        h = self._with_cls(kept)  # (B, 1 + K, D)
        for block in self.blocks:
            h = block(h)
        return self.norm(h), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, ndim: int) -> torch.Tensor:
        """``latent (B, 1 + K, D)``, ``ids_restore (B, L)`` → ``pred (B, L, patch_dim)``."""
        key = f"{ndim}d"
        h = self.decoder_embed[key](latent)  # (B, 1 + K, Dd)
        B, L = ids_restore.shape
        fill = self.mask_token.to(h.dtype).expand(B, L + 1 - h.shape[1], -1)
        patches = torch.cat([h[:, 1:], fill], dim=1)  # (B, L, Dd), visible first
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, h.shape[2]))  # unshuffle
        h = torch.cat([h[:, :1], self.decoder_pos_embed[key](patches)], dim=1)  # (B, 1 + L, Dd)
        for block in self.decoder_blocks:
            h = block(h)
        return self.decoder_pred[key](self.decoder_norm(h)[:, 1:])  # (B, L, patch_dim)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 7: mean squared error over the masked patches only (0-dim fp32).

        With ``norm_pix_loss`` each target patch is standardised by its own mean and variance.
        ``x: (B, C, *S)``, ``pred: (B, L, patch_dim)``, ``mask: (B, L)``.
        """
        if mask.shape != pred.shape[:2]:
            raise ValueError(
                f"MAE.forward_loss expects mask {tuple(pred.shape[:2])} for pred {tuple(pred.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        per_patch = self.patch_losses(x, pred)  # (B, L)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def patch_losses(self, x: torch.Tensor, pred: torch.Tensor, norm_pix: bool | None = None) -> torch.Tensor:
        """The squared error of every patch, averaged over its pixels: ``(B, L)`` fp32.

        Args:
            x: ``(B, C, *S)``, the input whose patches are the target.
            pred: ``(B, L, patch_dim)``, the decoder's prediction.
            norm_pix: standardise each target patch by its own mean and variance (the training
                target); False scores the raw pixels. Default: the config's ``norm_pix_loss``.
                A model trained with ``norm_pix_loss`` predicts standardised patches: scored on the
                raw pixels, its prediction is first mapped back with the target patch's own mean
                and standard deviation (as MAE's reconstructions are shown), so the raw error of
                a patch is its normalised error times the patch's variance (plus 1e-6).
        """
        target = self.patchify(x).float()  # (B, L, patch_dim)
        if pred.shape != target.shape:
            raise ValueError(f"MAE.patch_losses expects pred {tuple(target.shape)}, got {tuple(pred.shape)}")
        norm = self.config.norm_pix_loss if norm_pix is None else norm_pix
        pred = pred.float()
        if norm or self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            scale = (var + 1.0e-6).sqrt()
            if norm:
                target = (target - mean) / scale
            else:
                pred = pred * scale + mean
        return (pred - target).pow(2).mean(dim=-1)

    def forward(
        self, x: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode: returns ``(loss, pred (B, L, patch_dim), mask (B, L))``."""
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, x.ndim - 2)
        return self.forward_loss(x, pred, mask), pred, mask

    # -- unmasked features (statistics, repulsion, distillation) ------------------------------
    def unmasked_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One pass over the whole input: ``(block outputs, embedding)``.

        Returns:
            the output of every encoder block, each ``(B, 1 + L, D)`` with the class token first
            and before the final norm; and ``(B, D)``, the mean of the final normed patch tokens.
        """
        ndim = self._check_input(x, "unmasked_features")
        return self._encode_all(self._tokens(x, ndim))

    def _encode_all(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h = self._with_cls(tokens)  # (B, 1 + L, D)
        outputs = []
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        return outputs, self.norm(h)[:, 1:].mean(dim=1)

    def loss_and_features(
        self, x: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``forward(x, mask_ratio, noise)[0]`` and ``unmasked_features(x)`` with one patch embedding.

        The masked and the unmasked pass start from the same patch tokens (the patch embedding and
        the position table are computed once, and their gradients summed once); the two encoder
        passes stay separate, since attention over the visible tokens differs from attention over
        all of them. Returns ``(loss, block outputs, embedding)`` as the two calls would.

        Example:
            >>> m = create_model("vit_nano", img_size_2d=32)
            >>> x, noise = torch.rand(2, 3, 32, 32), torch.rand(2, 4)
            >>> loss, feats, emb = m.loss_and_features(x, 0.75, noise)
            >>> bool(torch.allclose(loss, m(x, 0.75, noise)[0])), len(feats), tuple(emb.shape)
            (True, 4, (2, 96))
        """
        ndim = self._check_input(x, "loss_and_features")
        self._check_masking(x, ndim, mask_ratio, noise)
        tokens = self._tokens(x, ndim)  # (B, L, D), shared by both passes
        latent, mask, ids_restore = self._encode_masked(tokens, mask_ratio, noise)
        loss = self.forward_loss(x, self.forward_decoder(latent, ids_restore, ndim), mask)
        feats, emb = self._encode_all(tokens)
        return loss, feats, emb

    def block_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The statistics taps (Appendix B.2): every encoder block's output ``(B, 1 + L, D)``."""
        return self.unmasked_features(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One ``(B, D)`` feature per sample: the mean of the final normed patch tokens."""
        return self.unmasked_features(x)[1]


def create_model(preset: str, **overrides: object) -> MAE:
    """Build an MAE from a preset, e.g. ``create_model("vit_nano", img_size_2d=64)``.

    Example:
        >>> m = create_model("vit_nano")
        >>> m.config.embed_dim, m.config.num_patches(2), m.config.num_patches(3)
        (96, 49, 36)
    """
    return MAE(preset_config(preset, **overrides))
