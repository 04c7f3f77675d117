"""The rewrites, one per module. Importing this package registers them by name.

Contraction passes: :class:`FoldBatchNormPass` (``"fold_batchnorm"``), :class:`FuseLinearPass`
(``"fuse_linear"``), :class:`RemoveIdentityPass` (``"remove_identity"``) and
:class:`~fxexpand.verify.VerifyPass` (``"verify"``).
"""

from ..verify import Verify, VerifyPass
from .fold_batchnorm import FoldBatchNorm, FoldBatchNormPass
from .fuse_linear import FuseLinear, FuseLinearPass
from .remove_identity import RemoveIdentity, RemoveIdentityPass

__all__ = [
    "FoldBatchNorm",
    "FoldBatchNormPass",
    "FuseLinear",
    "FuseLinearPass",
    "RemoveIdentity",
    "RemoveIdentityPass",
    "Verify",
    "VerifyPass",
]
