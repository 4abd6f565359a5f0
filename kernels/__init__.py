"""Triton kernels of invcoss, installed as ``invcoss.kernels`` (the ``triton`` backend of ``invcoss.ops``).

One module per op family, each with its ``@triton.jit`` kernels, then its launchers, then its
``torch.library`` ops (namespace ``invcoss_triton``, named as the ``invcoss`` ops of the extension and
the backend contract of :mod:`invcoss.ops.dispatch`) with their autograd formulas:

- :mod:`invcoss.kernels.tv`: total variation (Eq. 8), forward and a backward that recomputes the gradient.
- :mod:`invcoss.kernels.stats`: column statistics (Eq. 9) and stat matching (Eq. 3).
- :mod:`invcoss.kernels.repulsive`: the repulsive loss (Eq. 5), direct and Gram paths, rank-k updates.

Shared pieces: :mod:`invcoss.kernels.launch` (autotuning, op registration), :mod:`invcoss.kernels.reduce`
(the deterministic second reduction stage) and :mod:`invcoss.kernels.aot` (the sm_90 compile table).
Modules are imported on use: importing this package compiles and registers nothing.
"""
