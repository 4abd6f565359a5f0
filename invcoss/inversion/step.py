"""How one inversion step runs on a device: compiled or eager, precision, memory format, Adam.

:class:`~invcoss.inversion.config.InversionConfig` holds the choices (``compile_mode``,
``precision``, ``memory_format``, ``adam``, ``sync_every``, ``share_tokens``), each ``"auto"`` by
default; :func:`resolve_step_settings` turns them into the :class:`StepSettings` of a device. The
``auto`` choices are the fastest ones that keep a step's losses and gradients within
:data:`STEP_TOLERANCE` of the plain fp32 eager step (measured on this project's CPU; on a GPU
chosen by design, see below):

====================  ======================================  =====================================
choice                CPU (``auto``)                          CUDA (``auto``)
====================  ======================================  =====================================
compile_mode          ``off``: compiled, the quick steps      ``default``: inductor, no CUDA graphs
                      were no faster (0.95-0.97x of eager)
                      after 1.3-4 minutes of compiling
precision             ``fp32``                                ``bf16`` autocast for the generator
                                                              and the ViT (fp32 without bf16 support)
memory_format         ``channels_last`` (the generator's      ``channels_last`` (cuDNN's tensor-core
                      oneDNN convolutions: 2.2x faster in     convolutions want NHWC / NDHWC in
                      3D and 1.5x in 2D, forward+backward)    bf16; no transposes around them)
adam                  ``fused``                               ``fused``
====================  ======================================  =====================================

Statistics and losses are computed in fp32 under every precision: the block features, the
embedding and the generated image are cast up before the stat-matching, TV and repulsive losses,
and the MAE's reconstruction error is fp32 already. CUDA graphs (``compile_mode="reduce-overhead"``)
are offered but not the default: the paper's steps are hundreds of milliseconds of large matmuls and
convolutions, where launch overhead is well under 1%, while a graph is recorded again for every
fresh generator (the paper's 2D schedule makes one per batch) and holds a private memory pool per
recording. ``max-autotune-no-cudagraphs`` tunes the matmuls for a few more percent at the price of
minutes of compilation per batch shape; it is an option, not the default.

A compiled step compiles once per batch size (``dynamic=False``; a plan has at most two sizes),
not per generator: the generator's parameters are inputs of the graph. Compiled code goes to
inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary
folder), so a second run of the same shapes loads it instead of compiling.

Example:
    >>> from invcoss.inversion.config import InversionConfig
    >>> s = resolve_step_settings(InversionConfig.from_profile("quick", "ct"), "cpu")
    >>> s.compile_mode, s.precision, s.memory_format, s.adam
    ('off', 'fp32', 'channels_last', 'fused')
    >>> resolve_step_settings(InversionConfig.from_profile("quick", "ct"), "cuda").compile_mode
    'default'
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from invcoss.inversion.config import InversionConfig

__all__ = [
    "FORMER_STEP",
    "STEP_FIELDS",
    "CHECK_TOLERANCE",
    "STEP_TOLERANCE",
    "CompiledStepWarning",
    "StepSettings",
    "make_adam",
    "resolve_step_settings",
]

# How far a step may be from the fp32 eager step with contiguous tensors, for-loop Adam and separate
# MAE passes (tests/inversion/test_inversion_step.py): "loss", the relative error of each loss value;
# "grad", the relative error in norm, ||g - g_ref|| / ||g_ref||, of the gradient of all the
# generator's parameters together and of the latents'. fp32: other convolution algorithms
# (channels-last), inductor's fused kernels and Adam's fused update reorder sums (measured: losses
# within 1e-6, gradients within 2e-5). bf16: 8 bits of mantissa in the generator's and the ViT's
# convolutions and matmuls (measured at tiny sizes with random weights: losses within 7e-3, L_rep
# the farthest; gradients 7-13% in norm, 15-22% for the latents, a cosine similarity above 0.97).
# The InversionConfig fields that decide how a step runs, not what it optimises.
STEP_FIELDS = ("compile_mode", "precision", "memory_format", "adam", "sync_every", "share_tokens")
# How a step ran before these fields existed: a run folder whose manifest lacks them was made so
# (its resume needs them set so, e.g. ``--set memory_format=contiguous``).
FORMER_STEP = {
    "compile_mode": "off",
    "precision": "fp32",
    "memory_format": "contiguous",
    "adam": "for-loop",
    "sync_every": 1,
    "share_tokens": False,
}
STEP_TOLERANCE = {"fp32": {"loss": 1e-4, "grad": 1e-4}, "bf16": {"loss": 2e-2, "grad": 0.3}}
# How far the compiled step may be from the eager step at the same settings before a run sets it
# aside (InversionEngine.check_compiled_step). Wider than STEP_TOLERANCE, which the tests hold the
# supported torch to: the check guards against a wrong compilation (the latents' gradient dropped
# is an error of 1), not against another summation order. fp32: torch 2.11's CPU kernels put the
# 3D step's gradients 1e-4 from eager (torch 2.14: 4e-6); bf16: both sides round to 8 bits.
CHECK_TOLERANCE = {"fp32": {"loss": 1e-3, "grad": 1e-2}, "bf16": {"loss": 5e-2, "grad": 0.3}}


class CompiledStepWarning(UserWarning):
    """The compiled inversion step disagreed with the eager one and was set aside
    (:meth:`invcoss.inversion.InversionEngine.check_compiled_step`)."""


@dataclass(frozen=True)
class StepSettings:
    """The resolved step choices of one device (no ``auto`` left).

    Attributes:
        compile_mode: ``off`` or a :func:`torch.compile` mode.
        precision: ``fp32`` or ``bf16`` (autocast of the generator and the frozen ViT).
        memory_format: ``channels_last`` or ``contiguous`` (the generator's weights and activations).
        adam: ``fused``, ``foreach`` or ``for-loop``.
        sync_every: losses are read back to the host every this many steps.
        share_tokens: the MAE's masked and unmasked passes share the patch embedding.
    """

    compile_mode: str
    precision: str
    memory_format: str
    adam: str
    sync_every: int
    share_tokens: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast on ``device`` when the precision asks for it, else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def resolve_step_settings(config: InversionConfig, device: torch.device | str) -> StepSettings:
    """The step choices of ``config`` on ``device``, with every ``auto`` replaced (module docstring).

    Raises:
        ValueError: ``precision="bf16"`` on a device without bf16 support.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    compile_mode = config.compile_mode
    if compile_mode == "auto":
        compile_mode = "default" if cuda else "off"
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if cuda and _bf16_supported(device) else "fp32"
    elif precision == "bf16" and not _bf16_supported(device):
        raise ValueError(f"precision 'bf16' needs a device with bf16 support, got {device}")
    memory_format = config.memory_format
    if memory_format == "auto":
        memory_format = "channels_last"
    adam = config.adam
    if adam == "auto":
        adam = "fused" if device.type in ("cpu", "cuda") else "foreach"
    return StepSettings(compile_mode, precision, memory_format, adam, config.sync_every, config.share_tokens)


def make_adam(params: Iterable[torch.Tensor], lr: float, impl: str) -> torch.optim.Adam:
    """Adam over ``params`` with the ``impl`` of :class:`StepSettings` (``fused``, ``foreach``, ``for-loop``)."""
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.Adam(params, lr=lr, **kw)


def to_memory_format(module: torch.nn.Module, ndim: int, memory_format: str) -> torch.nn.Module:
    """``module`` with its weights in ``memory_format`` for ``ndim``-dimensional convolutions."""
    if memory_format == "channels_last":
        return module.to(memory_format=torch.channels_last_3d if ndim == 3 else torch.channels_last)
    return module
