"""Models of InvCoSS: the dimension-free masked autoencoder and the inversion generators.

* :class:`MAE` (:func:`create_model`, :func:`list_presets`): ViT masked autoencoder for 2D images
  and 3D volumes sharing one transformer (SPEC section 3, Appendix C).
* :class:`InvUNet`: the paper's dual-stream generator (Appendix B.3, Table 4), built from
  :class:`NoiseProjector`, :class:`MemoryCacheBranch`, :class:`InversionBranch`, :class:`UpBlock`
  and :class:`ConvBlock`.
* :class:`BottomUpGenerator` (:func:`create_bottom_up`): the single-stream baseline of Table 3.
* Checkpoints: ``model.save_pretrained(dir)``, ``Model.from_pretrained(dir)`` and
  :func:`load_pretrained_into` (safetensors + ``config.json``).

Example:
    >>> import torch
    >>> from invcoss.models import InvUNet, create_model
    >>> mae = create_model("vit_nano", img_size_2d=32)
    >>> g = InvUNet(ndim=2, latent_dim=8, out_size=32, channels=(8, 8, 4, 4, 4))
    >>> mae.embed(g(torch.randn(2, 8))).shape
    torch.Size([2, 96])
"""

from invcoss.models.blocks import ConvBlock, GeneratorConfig, LatentGenerator, NoiseProjector, UpBlock
from invcoss.models.bottom_up import BOTTOM_UP_PRESETS, BottomUpGenerator, create_bottom_up
from invcoss.models.checkpoint import PretrainedMixin, load_pretrained_into
from invcoss.models.invunet import InversionBranch, InvUNet, MemoryCacheBranch
from invcoss.models.mae import MAE, create_model
from invcoss.models.mae_config import MAEConfig, list_presets, preset_config

__all__ = [
    "BOTTOM_UP_PRESETS",
    "MAE",
    "BottomUpGenerator",
    "ConvBlock",
    "GeneratorConfig",
    "InvUNet",
    "InversionBranch",
    "LatentGenerator",
    "MAEConfig",
    "MemoryCacheBranch",
    "NoiseProjector",
    "PretrainedMixin",
    "UpBlock",
    "create_bottom_up",
    "create_model",
    "list_presets",
    "load_pretrained_into",
    "preset_config",
]
