"""invcoss: inversion-driven continual self-supervised learning for medical images.

``from invcoss import ops`` gives the fused kernels (total variation, Welford statistics, stat
matching, repulsive cosine loss); ``invcoss.models``, ``invcoss.data``, ``invcoss.feature_stats``,
``invcoss.inversion`` and ``invcoss.continual`` build the method on top of them.
"""

from invcoss._build import ExtensionBuildWarning

__all__ = ["ExtensionBuildWarning", "__version__"]
__version__ = "0.2.0"

# A compiled extension built against another torch than the installed one: warn now, with the fix
# (invcoss._build reads torch's version file; nothing here imports torch).
import os as _os

if _os.environ.get("INVCOSS_DISABLE_EXTENSION", "0") != "1":
    from invcoss._build import check_installed_torch as _check_installed_torch

    _check_installed_torch()
