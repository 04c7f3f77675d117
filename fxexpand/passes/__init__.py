"""The rewrites, one per module. Importing this package registers them by name.

Contraction: :class:`FoldBatchNormPass` (``"fold_batchnorm"``), :class:`FuseLinearPass`
(``"fuse_linear"``), :class:`RemoveIdentityPass` (``"remove_identity"``),
:class:`RestoreOriginalPass` (``"restore_original"``) and :class:`~fxexpand.verify.VerifyPass`
(``"verify"``).

Expansion: :class:`InsertInvertedResidualPass` (``"insert_inverted_residual"``, NetBooster),
:class:`LinearExpandPass` (``"linear_expand"``, ExpandNets) and :class:`DecayActivationsPass`
(``"decay_activations"``).

Growth (Network Expansion): :class:`InsertEMABlocksPass` (``"insert_ema_blocks"``, depth) and
:class:`GrowWidthPass` (``"grow_width"``, width).
"""

from ..verify import Verify, VerifyPass
from .decay_activations import DecayActivations, DecayActivationsPass
from .fold_batchnorm import FoldBatchNorm, FoldBatchNormPass
from .fuse_linear import FuseLinear, FuseLinearPass
from .grow_width import GrowWidth, GrowWidthPass
from .insert_ema_blocks import InsertEMABlocks, InsertEMABlocksPass
from .insert_inverted_residual import InsertInvertedResidual, InsertInvertedResidualPass
from .linear_expand import LinearExpand, LinearExpandPass
from .remove_identity import RemoveIdentity, RemoveIdentityPass
from .restore_original import RestoreOriginal, RestoreOriginalPass

__all__ = [
    "DecayActivations", "DecayActivationsPass",
    "FoldBatchNorm", "FoldBatchNormPass",
    "FuseLinear", "FuseLinearPass",
    "GrowWidth", "GrowWidthPass",
    "InsertEMABlocks", "InsertEMABlocksPass",
    "InsertInvertedResidual", "InsertInvertedResidualPass",
    "LinearExpand", "LinearExpandPass",
    "RemoveIdentity", "RemoveIdentityPass",
    "RestoreOriginal", "RestoreOriginalPass",
    "Verify", "VerifyPass",
]
