"""invcoss: inversion-driven continual self-supervised learning for medical images.

``from invcoss import ops`` gives the fused kernels (total variation, Welford statistics, stat
matching, repulsive cosine loss); ``invcoss.models``, ``invcoss.data``, ``invcoss.feature_stats``,
``invcoss.inversion`` and ``invcoss.continual`` build the method on top of them.
"""

__version__ = "0.2.0"
