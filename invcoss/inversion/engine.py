"""Data-free model inversion (Stage 1 of Algorithm 1, Eq. 6): a frozen MAE and its statistics → images.

For each batch a generator (InvUNet by default, fresh per the re-initialisation schedule of
:class:`~invcoss.inversion.config.InversionConfig`) and fresh latents z are optimised with Adam
against the frozen model::

    L_inv = L_task            masked reconstruction of the generated image by the MAE (Eq. 7)
          + alpha_norm * sum_l stat_matching_loss(block_l(x), mu_l, sigma2_l)           (Eq. 3)
          + alpha_img  * total_variation(x)                                             (Eq. 8)
          + alpha_rep  * RepulsivePool.loss(embed(x))                                   (Eq. 5)

``block_l`` are the encoder block outputs on the unmasked image (the taps the statistics were
collected at, Appendix B.2) and ``embed`` the model's pooled feature. Every loss but L_task goes
through :mod:`invcoss.ops`, so the fused kernels carry the hot path; ``backend=`` picks them. After
a batch its images are kept and their features pushed into the pool, whose capacity is the number of
samples requested (Sec. 3.4).

Randomness comes only from generators seeded by ``(seed, what, index)``, never the global RNG, so a
batch depends on the seed, its index and the state carried from the previous batch (the generator
under training, its Adam moments and the pool), which :meth:`InversionEngine.state_tensors` captures for
resuming. :meth:`InversionEngine.generate` keeps everything in memory; the
:class:`~invcoss.inversion.run.Inverter` built on it also writes resumable runs to folders
(:mod:`invcoss.inversion.run`). The batch plan and the result types are in
:mod:`invcoss.inversion.batches` (exported here too).

Example:
    >>> from invcoss.models import create_model
    >>> from invcoss.inversion.config import InversionConfig
    >>> model = create_model("vit_nano", img_size_2d=32)
    >>> stats = [(torch.zeros(5, 96), torch.ones(5, 96))] * 4  # per block (L, D) mean and variance
    >>> cfg = InversionConfig.from_profile("quick", "xray", batch_size=2, steps=2, warmup_steps=2,
    ...                                    latent_dim=8, generator_channels=(8, 8, 4))
    >>> out = InversionEngine(model, stats, cfg, backend="torch").generate(5)  # one batch of 5
    >>> tuple(out.images.shape), len(out.batches), sorted(out.batches[0].curves)
    ((5, 3, 32, 32), 1, ['img', 'norm', 'rep', 'step', 'task', 'total'])
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from invcoss import ops
from invcoss.feature_stats import FeatureStats, config_hash, stats_data
from invcoss.inversion.batches import BatchResult, GenerateResult, NonFiniteLossError, StepInfo, plan_batches
from invcoss.inversion.config import InversionConfig
from invcoss.inversion.step import (
    CHECK_TOLERANCE,
    CompiledStepWarning,
    StepSettings,
    make_adam,
    resolve_step_settings,
    to_memory_format,
)
from invcoss.modality import get_modality
from invcoss.models import BottomUpGenerator, GeneratorConfig, InvUNet
from invcoss.models.blocks import upsample2x_linear
from invcoss.rng import derive_seed  # re-exported: its home before 0.3

__all__ = [
    "BatchResult",
    "GenerateResult",
    "InversionEngine",
    "NonFiniteLossError",
    "StepInfo",
    "derive_seed",
    "plan_batches",
]


def _stat_targets(stats, model: nn.Module, modality: str) -> list[tuple[Tensor, Tensor]]:
    """``[(mean, var)]`` per block from a FeatureStats or a sequence of pairs, checked against the model."""

    cfg = model.config
    if isinstance(stats, FeatureStats):
        if stats.modality != modality:
            raise ValueError(f"the statistics are for {stats.modality}, not {modality}")
        if stats.config_hash != config_hash(cfg):
            raise ValueError(
                f"the statistics were collected with {stats.preset} (config {stats.config_hash}, input "
                f"{stats.input_size}) but the model is {cfg.name} (config {config_hash(cfg)}); "
                "invert a model with the statistics of its own architecture"
            )
        pairs = list(zip(stats.mean, stats.var))
    else:
        pairs = [(m, v) for m, v in stats]
    ndim = get_modality(modality).ndim
    want = (cfg.num_patches(ndim) + 1, cfg.embed_dim)
    shapes = sorted({tuple(t.shape) for p in pairs for t in p})
    if len(pairs) != cfg.depth or shapes != [want]:
        raise ValueError(
            f"the statistics hold {len(pairs)} blocks of shape {shapes}, but model {cfg.name} has "
            f"{cfg.depth} blocks with {ndim}D features of shape {want}"
        )
    for i, (m, v) in enumerate(pairs):  # once per run, never per step
        ops.check_reference_stats(m, v, layer=f"the statistics of block {i}")
    return [(m.detach().float(), v.detach().float()) for m, v in pairs]


class InversionEngine:
    """Inverts a frozen MAE into synthetic samples that match its stored feature statistics.

    The model is put in eval mode and its parameters stop requiring gradients (it is frozen).

    Args:
        model: an :class:`invcoss.models.MAE` (``forward(x, mask_ratio, noise)``,
            ``unmasked_features``) taking the config's modality.
        stats: an :class:`invcoss.feature_stats.FeatureStats` of this model architecture and modality, or a
            sequence of ``(mean, var)`` pairs, one ``(L, D)`` pair per encoder block. The data
            summary a FeatureStats records (``self.data``) fits an MRI generator's output range
            (:meth:`invcoss.modality.InputSpace.fitted`) and gives written volumes their spacing.
        config: an :class:`~invcoss.inversion.config.InversionConfig`.
        device: where to optimise (default: the model's device).
        backend: the :mod:`invcoss.ops` backend of the stat, TV and repulsive losses.

    Raises:
        ValueError: statistics of another architecture or modality, or a generator that cannot
            make the model's input size.
    """

    def __init__(
        self,
        model: nn.Module,
        stats,
        config: InversionConfig,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        self.config = config
        self.data = stats_data(stats, config.modality)  # spacing and value range of the statistics' data
        self.space = config.space.fitted(*self.data.value_range) if self.data else config.space
        self.ndim = config.ndim
        self.backend = backend
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval().requires_grad_(False)
        cfg = model.config
        self.input_shape = (cfg.in_chans(self.ndim), *cfg.img_size(self.ndim))
        self.num_patches = cfg.num_patches(self.ndim)
        size = self.input_shape[1:]
        if any(s % config.upsample for s in size[-2:]):
            raise ValueError(f"upsample {config.upsample} does not divide the model's input size {size}")
        self.generated_size = (*size[:-2], *(s // config.upsample for s in size[-2:]))
        self.targets = [
            (m.to(self.device), v.to(self.device)) for m, v in _stat_targets(stats, model, config.modality)
        ]
        self._generator_config()  # fail now, not at the first batch
        self.step_settings: StepSettings = resolve_step_settings(config, self.device)
        mode = self.step_settings.compile_mode
        # The pool's size changes after every batch, so L_rep stays outside the compiled graph.
        self._forward_fn = (
            self._forward
            if mode == "off"
            else torch.compile(self._forward, mode=mode, fullgraph=True, dynamic=False)
        )
        self._compiled_keys: set[tuple] = set()
        self.compile_seconds = 0.0  # all compiling steps so far (see BatchResult.compile_seconds)
        # Why the compiled step was set aside for the eager one (see check_compiled_step), or None.
        self.compile_fallback: str | None = None
        self.pool: ops.RepulsivePool | None = None
        self._gen: nn.Module | None = None
        self._opt_g: torch.optim.Adam | None = None

    # -- generator -------------------------------------------------------------------------------
    def _generator_config(self) -> dict:
        c = self.config
        kw = dict(
            ndim=self.ndim,
            latent_dim=c.latent_dim,
            out_size=self.generated_size,
            out_channels=self.space.channels,
            out_activation=self.space.activation,
        )
        if c.generator_channels is not None:
            kw["channels"] = c.generator_channels
        if c.generator != "pixels":
            gc = GeneratorConfig(**kw)  # validates the size against the upsampling factor
            if self.ndim == 3 and math.prod(gc.bottleneck_size) == 1:
                # InstanceNorm cannot normalise a single voxel.
                raise ValueError(
                    f"the 3D generator's bottleneck is a single voxel (size {self.generated_size} over "
                    f"{len(gc.channels) - 1} levels); use fewer generator_channels or a smaller upsample"
                )
        return kw

    def _new_generator(self, index: int) -> nn.Module:

        cls = InvUNet if self.config.generator == "invunet" else BottomUpGenerator
        # Initialised on the CPU from its own seed, so the weights do not depend on the device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "generator", index))
            gen = cls(**self._generator_config())
        return to_memory_format(gen.to(self.device), self.ndim, self.step_settings.memory_format).train()

    def _adam(self, params, lr: float) -> torch.optim.Adam:
        return make_adam(params, lr, self.step_settings.adam)

    def _ensure_generator(self, batch: int) -> bool:
        """Make the generator of ``batch`` current; True when it is fresh."""
        c = self.config
        if c.generator == "pixels":
            return True
        fresh = batch % c.generator_every == 0 or self._gen is None
        if fresh:
            self._gen = self._new_generator(batch // c.generator_every)
            self._opt_g = self._adam(self._gen.parameters(), c.lr_generator)
        return fresh

    def start(self, num_samples: int) -> None:
        """Reset the carried state for a run of ``num_samples`` (an empty pool of that capacity)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.pool = ops.RepulsivePool(
            capacity=num_samples, dim=self.model.config.embed_dim, device=self.device, backend=self.backend
        )
        self._gen, self._opt_g = None, None

    def num_batches(self, num_samples: int) -> int:
        return len(self.batch_sizes(num_samples))

    # -- losses ----------------------------------------------------------------------------------
    def images(self, params: Tensor) -> Tensor:
        """Model inputs ``(B, C, *S)`` from latents (through the generator) or from pixels."""
        if self.config.generator == "pixels":
            act = torch.tanh if self.space.activation == "tanh" else torch.sigmoid
            raw = act(params)
        else:
            with self.step_settings.autocast(self.device):
                raw = self._gen(params).float()  # what follows, and every loss on it, in fp32
        if self.config.upsample == 2 and torch.compiler.is_compiling():
            # The same values as below, with a backward inductor compiles right (upsample2x_linear).
            raw = upsample2x_linear(raw, (raw.ndim - 2, raw.ndim - 1))
        elif self.config.upsample > 1:
            mode = "bilinear" if self.ndim == 2 else "trilinear"
            raw = F.interpolate(raw, size=self.input_shape[1:], mode=mode, align_corners=False)
        return self.space.to_model_input(raw, self.input_shape[0])

    def stat_loss(self, feats: Sequence[Tensor]) -> Tensor:
        """Sum over blocks of :func:`invcoss.ops.stat_matching_loss` (L_norm, Eq. 3)."""
        total = None
        for f, (mean, var) in zip(feats, self.targets, strict=True):
            term = ops.stat_matching_loss(f, mean, var, backend=self.backend)
            total = term if total is None else total + term
        return total

    def block_stat_loss(self, x: Tensor) -> Tensor:
        """L_norm of model inputs ``x`` (the ViT at the step's precision, the loss in fp32)."""
        with self.step_settings.autocast(self.device):
            feats = self.model.block_features(x)
        return self.stat_loss([f.float() for f in feats])

    def model_terms(self, x: Tensor, mask_noise: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Every enabled term of Eq. 6 but L_rep for model inputs ``x: (B, C, *S)``, and ``embed(x)``.

        The frozen MAE runs at the step's precision; its features, the embedding and every loss
        are fp32. With ``share_tokens`` the masked and unmasked passes share one patch embedding
        (:meth:`invcoss.models.MAE.loss_and_features`).
        """
        c, s = self.config, self.step_settings
        terms: dict[str, Tensor] = {}
        with s.autocast(self.device):
            if "task" in c.losses and s.share_tokens:
                task, feats, emb = self.model.loss_and_features(x, c.mask_ratio, noise=mask_noise)
                terms["task"] = task
            else:
                if "task" in c.losses:
                    terms["task"] = self.model(x, c.mask_ratio, noise=mask_noise)[0]
                feats, emb = self.model.unmasked_features(x)  # per block (B, 1 + L, D); (B, D)
        if "task" in terms:
            terms["task"] = terms["task"].float()
        if "norm" in c.losses:
            terms["norm"] = self.stat_loss([f.float() for f in feats])
        if "img" in c.losses:
            terms["img"] = ops.total_variation(x, reduction=c.tv_reduction, backend=self.backend)
        return terms, emb.float()

    def loss_terms(self, x: Tensor, mask_noise: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The enabled terms of Eq. 6 for model inputs ``x: (B, C, *S)``, and ``embed(x)``."""
        terms, emb = self.model_terms(x, mask_noise)
        if "rep" in self.config.losses:
            terms["rep"] = self.pool.loss(emb)
        return terms, emb

    def _forward(self, params: Tensor, mask_noise: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The compiled part of a step: images, both MAE passes, every term but L_rep."""
        return self.model_terms(self.images(params), mask_noise)

    def weighted(self, terms: dict[str, Tensor]) -> Tensor:
        c = self.config
        weights = {"task": 1.0, "norm": c.alpha_norm, "img": c.alpha_img, "rep": c.alpha_rep}
        return sum(weights[k] * v for k, v in terms.items())

    # -- one batch -------------------------------------------------------------------------------
    def begin_batch(
        self, batch: int, size: int
    ) -> tuple[Tensor, list[torch.optim.Optimizer], bool, torch.Generator]:
        """The trainable inputs of batch ``batch``: ``(params, optimizers, fresh, rng)``.

        ``params`` are the latents z (or the pixels with ``generator="pixels"``), drawn from the
        batch's own seed; ``optimizers`` hold the generator's Adam (carried across the batches of
        one generator) and the one of ``params``; ``fresh`` says the generator is new, so the batch
        takes ``warmup_steps``; ``rng`` draws the batch's masks.
        """
        c = self.config
        fresh = self._ensure_generator(batch)
        rng = torch.Generator().manual_seed(derive_seed(c.seed, "batch", batch))
        if c.generator == "pixels":
            init = torch.randn((size, self.space.channels, *self.generated_size), generator=rng)
            params = init.to(self.device).requires_grad_()
            return params, [self._adam([params], c.lr_pixels)], fresh, rng
        params = torch.randn(size, c.latent_dim, generator=rng).to(self.device).requires_grad_()
        return params, [self._opt_g, self._adam([params], c.lr_latent)], fresh, rng

    def random_mask(self, size: int, rng: torch.Generator) -> Tensor:
        """MAE masking noise ``(size, num_patches)`` on the device, drawn on the CPU from ``rng``."""
        return torch.rand(size, self.num_patches, generator=rng).to(self.device)

    def random_masks(self, count: int, size: int, rng: torch.Generator) -> Tensor:
        """``count`` masks ``(count, size, num_patches)``: the same as ``count`` calls of
        :meth:`random_mask` (the CPU generator fills them in order), copied to the device at once
        and without waiting for it."""
        masks = torch.rand(count, size, self.num_patches, generator=rng)
        if self.device.type == "cuda":
            masks = masks.pin_memory()
        return masks.to(self.device, non_blocking=True)

    @property
    def value_names(self) -> list[str]:
        """The names of the values a step returns: every enabled term, then ``total``."""
        return [*self.config.losses, "total"]

    def _losses(self, params: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        terms, emb = self._forward_fn(params, mask)
        if "rep" in self.config.losses:
            terms["rep"] = self.pool.loss(emb)  # last, as in LOSS_TERMS
        return terms, self.weighted(terms)

    def step_async(self, params: Tensor, opts: Sequence[torch.optim.Optimizer], mask: Tensor) -> Tensor:
        """One optimisation step of Eq. 6 without waiting for the device.

        Returns the values :meth:`step` returns as one fp32 tensor on the device, in the order of
        :attr:`value_names`, before the update. The update is made even when a value is not finite:
        the caller reads the values later (:meth:`invert_batch`: every ``sync_every`` steps) and
        abandons the batch then. The first step of each batch size of a compiled step compiles it
        and is timed into :attr:`compile_seconds`.
        """
        t0 = time.perf_counter()
        key, compiling = self._checked_before_compiling(params, mask)
        terms, total = self._losses(params, mask)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in opts:
            opt.step()
        values = torch.stack([*terms.values(), total]).detach()
        if compiling:
            values = values.cpu()  # the compiled graphs have run once, forward and backward
            self._compiled_keys.add(key)
            self.compile_seconds += time.perf_counter() - t0
        return values

    def check_compiled_step(self, params: Tensor, mask: Tensor) -> str | None:
        """Compare the compiled step with the eager one on this step's inputs: None when they agree.

        Both compute the loss values and the gradients of the latents and of the generator's
        parameters (nothing is updated, the generator's buffers are put back); they must agree
        within :data:`~invcoss.inversion.step.CHECK_TOLERANCE` of the step's precision, else the
        returned line says what differs. :meth:`step_async` runs it before the first compiled step
        of each batch size: a compiler that gets the step wrong (some releases' inductor drop the
        latents' gradient) must not silently stop the latents from learning.
        """
        buffers = {k: v.clone() for k, v in self._gen.named_buffers()} if self._gen is not None else {}
        weights = list(self._gen.parameters()) if self._gen is not None else []

        def run(forward: Callable) -> tuple[dict[str, float], list[Tensor]]:
            terms, emb = forward(params, mask)
            if "rep" in self.config.losses:
                terms["rep"] = self.pool.loss(emb)
            total = self.weighted(terms)
            grads = torch.autograd.grad(total, [params, *weights], allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, [params, *weights])]
            values = {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}
            with torch.no_grad():
                for name, value in buffers.items():  # batch-norm running statistics
                    self._gen.get_buffer(name).copy_(value)
            return values, grads

        want, want_grads = run(self._forward)
        got, got_grads = run(self._forward_fn)
        tol = CHECK_TOLERANCE[self.step_settings.precision]
        problems = [
            f"{k} {got[k]:.6g} vs {want[k]:.6g}"
            for k in want
            if math.isfinite(want[k]) and not abs(got[k] - want[k]) <= tol["loss"] * max(abs(want[k]), 1e-12)
        ]
        trained = "pixel" if self.config.generator == "pixels" else "latent"
        parts = {trained: ([got_grads[0]], [want_grads[0]]), "generator": (got_grads[1:], want_grads[1:])}
        for what, (a, b) in parts.items():
            if not b:
                continue
            ref = torch.cat([g.float().flatten() for g in b])
            diff = torch.cat([g.float().flatten() for g in a]) - ref
            err = float(diff.norm() / ref.norm().clamp_min(1e-30))
            if not err <= tol["grad"]:
                problems.append(f"{what} gradients off by {err:.3g} in norm (tolerance {tol['grad']})")
        return "; ".join(problems) if problems else None

    def _checked_before_compiling(self, params: Tensor, mask: Tensor) -> tuple[tuple, bool]:
        """``(batch-size key, whether this step compiles)``; a step that compiles is checked first
        (:meth:`check_compiled_step`) and, when the check fails, runs eagerly."""
        key = (params.shape[0], self.config.generator)
        compiling = self._forward_fn != self._forward and key not in self._compiled_keys
        if compiling:
            mismatch = self.check_compiled_step(params, mask)
            if mismatch is not None:
                self._fall_back_to_eager(mismatch)
        return key, compiling

    def _fall_back_to_eager(self, mismatch: str) -> None:
        self.compile_fallback = mismatch
        self._forward_fn = self._forward
        warnings.warn(
            f"the compiled inversion step differs from the eager step ({mismatch}) with torch "
            f"{torch.__version__} on {self.device}: the step runs eagerly from now on "
            "(set compile_mode=off to skip compiling; another torch release may compile it right)",
            CompiledStepWarning,
            stacklevel=4,
        )

    def step(self, params: Tensor, opts: Sequence[torch.optim.Optimizer], mask: Tensor) -> dict[str, float]:
        """One optimisation step of Eq. 6; returns every enabled term and ``total`` before the step.

        When a value is not finite nothing is updated (the caller decides what to do). Reading the
        values synchronises the device in the middle of the step; :meth:`invert_batch` runs
        :meth:`step_async` instead. A compiled step is checked before its first use, as there.
        """
        key, compiling = self._checked_before_compiling(params, mask)
        if compiling:
            self._compiled_keys.add(key)
        terms, total = self._losses(params, mask)
        values = {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}
        if not all(math.isfinite(v) for v in values.values()):
            return values
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in opts:
            opt.step()
        return values

    def invert_batch(
        self, batch: int, size: int, num_batches: int = 1, on_step: Callable[[StepInfo], None] | None = None
    ) -> BatchResult:
        """Optimise batch ``batch`` of ``size`` samples; push its features into the pool.

        Raises:
            NonFiniteLossError: a loss became NaN or infinite (nothing of the batch is kept; the
                carried state is left as it was before the batch).
        """
        if self.pool is None:
            raise RuntimeError("call start(num_samples) before invert_batch")
        c = self.config
        t0 = time.perf_counter()
        compiled_before = self.compile_seconds
        saved = self.state_tensors()  # to restore on a non-finite loss
        params, opts, fresh, rng = self.begin_batch(batch, size)
        steps = c.warmup_steps if fresh else c.steps
        names = self.value_names
        curves: dict[str, list[float]] = {"step": [], **{k: [] for k in names}}
        every = self.step_settings.sync_every
        # Step 1 and the final evaluation share a mask, so curves[k][0] and final[k] compare alike.
        first_mask = self.random_mask(size, rng)
        pending: list[Tensor] = []  # values of the steps not yet read back
        for step in range(steps):
            if step % every == 0:  # the masks of the next `every` steps, in one copy
                chunk = self.random_masks(min(every, steps - step) - (step == 0), size, rng)
            if step == 0:
                mask = first_mask
            else:
                mask = chunk[step % every - (step < every)]
            pending.append(self.step_async(params, opts, mask))
            if len(pending) < every and step + 1 < steps:
                continue
            # One read-back (one host synchronisation) per `every` steps.
            rows = torch.stack(pending).tolist()
            first = step + 1 - len(pending)
            pending = []
            for i, row in enumerate(rows, start=first + 1):
                values = dict(zip(names, row))
                if not all(math.isfinite(v) for v in row):
                    self.load_state_tensors(saved)
                    bad = ", ".join(f"{k}={v}" for k, v in values.items())
                    raise NonFiniteLossError(
                        f"batch {batch}, step {i}/{steps}: the loss is not finite ({bad}); "
                        "nothing of this batch was written. Lower lr_generator/lr_latent or check the "
                        "statistics file"
                    )
                curves["step"].append(i)
                for k, v in values.items():
                    curves[k].append(v)
                if on_step is not None:
                    on_step(StepInfo(batch, num_batches, i, steps, values))
        with torch.no_grad():
            x = self.images(params)
            terms, emb = self.loss_terms(x, first_mask)
            final = {k: float(v) for k, v in terms.items()}
            stat = float(terms["norm"]) if "norm" in terms else float(self.block_stat_loss(x))
            noise_rng = torch.Generator().manual_seed(derive_seed(c.seed, "noise", batch))
            noise_x = self.space.noise((size, *self.input_shape), noise_rng).to(self.device)
            noise_stat = float(self.block_stat_loss(noise_x))
        if not (torch.isfinite(x).all() and math.isfinite(stat)):
            self.load_state_tensors(saved)
            raise NonFiniteLossError(
                f"batch {batch}: the final images are not finite; nothing of this batch was written"
            )
        self.pool.push(emb.detach())
        return BatchResult(
            index=batch,
            images=x.detach().float().cpu(),
            embeddings=emb.detach().float().cpu(),
            curves=curves,
            final=final,
            stat_loss=stat,
            noise_stat_loss=noise_stat,
            fresh_generator=fresh,
            seconds=time.perf_counter() - t0,
            compile_seconds=self.compile_seconds - compiled_before,
        )

    def batch_sizes(self, num_samples: int) -> list[int]:
        """The planned batch sizes of a run of ``num_samples``: :func:`plan_batches` of the config."""
        return plan_batches(num_samples, self.config.batch_size, self.config.min_batch_size)

    def generate(self, num_samples: int, on_step: Callable[[StepInfo], None] | None = None) -> GenerateResult:
        """Invert ``num_samples`` samples in memory (no files).

        Returns:
            :class:`GenerateResult` with ``images (N, C, *S)``, ``embeddings (N, D)`` and every batch.
        """
        self.start(num_samples)
        sizes = self.batch_sizes(num_samples)
        batches = [self.invert_batch(b, n, len(sizes), on_step) for b, n in enumerate(sizes)]
        return GenerateResult(
            images=torch.cat([r.images for r in batches]),
            embeddings=torch.cat([r.embeddings for r in batches]),
            batches=batches,
        )

    # -- carried state (resume) ------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The state carried between batches as flat CPU tensors: generator, its Adam moments, pool."""
        out: dict[str, Tensor] = {}
        if self.pool is not None:
            out["pool.features"] = self.pool.features().detach().cpu().clone()
            out["pool.gram"] = self.pool.gram.detach().cpu().clone()
            out["pool.pushes"] = torch.tensor(self.pool.pushes)
        if self._gen is not None:
            for k, v in self._gen.state_dict().items():
                out[f"generator.{k}"] = v.detach().cpu().clone()
            for i, st in self._opt_g.state_dict()["state"].items():
                for k, v in st.items():
                    out[f"adam.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        return out

    def load_state_tensors(self, state: dict[str, Tensor], batch: int | None = None) -> None:
        """Restore what :meth:`state_tensors` returned (``batch``: the next batch, for a generator)."""
        if "pool.features" in state:
            self.pool.load_state_dict(
                {
                    "features": state["pool.features"].to(self.device),
                    "capacity": torch.tensor(self.pool.capacity),
                    "pushes": state["pool.pushes"],
                }
            )
            # The incrementally updated Gram matrix, bit for bit, so a resumed run continues exactly.
            self.pool.gram.copy_(state["pool.gram"].to(self.device))
        gen_state = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
        if not gen_state:
            self._gen, self._opt_g = None, None
            return
        if self._gen is None:
            index = (batch if batch is not None else 0) // self.config.generator_every
            self._gen = self._new_generator(index)
            self._opt_g = self._adam(self._gen.parameters(), self.config.lr_generator)
        self._gen.load_state_dict({k: v.to(self.device) for k, v in gen_state.items()})
        params = [p for group in self._opt_g.param_groups for p in group["params"]]
        moments: dict[int, dict[str, Tensor]] = {}
        for k, v in state.items():
            if k.startswith("adam."):
                _, i, name = k.split(".", 2)
                if name != "step":  # in the layout of its parameter (channels-last weights)
                    v = torch.empty_like(params[int(i)]).copy_(v)
                moments.setdefault(int(i), {})[name] = v
        groups = self._opt_g.state_dict()["param_groups"]
        self._opt_g.load_state_dict({"state": moments, "param_groups": groups})
