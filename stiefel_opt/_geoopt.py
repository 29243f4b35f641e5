"""geoopt, imported once with its TorchScript deprecation warnings silenced.

geoopt 0.5.1 applies ``torch.jit.script`` at ~73 call sites at import time; every one warns on
current torch. We only use its ``Manifold`` base class and ``ManifoldParameter`` for interop.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import geoopt  # noqa: F401
    from geoopt import ManifoldParameter, ManifoldTensor  # noqa: F401
    from geoopt.manifolds.base import Manifold  # noqa: F401
    from geoopt.manifolds.stiefel import Stiefel as GeooptStiefel  # noqa: F401
