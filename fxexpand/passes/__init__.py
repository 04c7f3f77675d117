"""The rewrites, one per module, each importing only public :mod:`fxexpand.core` names. Importing
this package registers them by name (``fxexpand.registered_passes()``).

Contraction: :class:`FoldBatchNorm` (``"fold_batchnorm"``), :class:`FuseLinear` (``"fuse_linear"``),
:class:`RemoveIdentity` (``"remove_identity"``), :class:`RestoreOriginal` (``"restore_original"``) and
:class:`Verify` (``"verify"``; needs arguments, so not buildable by name).

Expansion: :class:`InsertInvertedResidual` (``"insert_inverted_residual"``, NetBooster),
:class:`LinearExpand` (``"linear_expand"``, ExpandNets) and :class:`DecayActivations`
(``"decay_activations"``).

NetAug: :class:`AugmentWidth` (``"augment_width"``) builds the weight-shared augmented model;
:class:`ExtractBase` (``"extract_base"``) slices it back to the tiny model during contraction.

BoostNet: :class:`InsertEarlyExits` (``"insert_early_exits"``) adds boosted early exits;
:class:`RemoveExits` (``"remove_exits"``) takes them out again during contraction.

Growth (Network Expansion): :class:`InsertEMABlocks` (``"insert_ema_blocks"``, depth; needs
``ema_model``) and :class:`GrowWidth` (``"grow_width"``, width).

Pipelines that compose these passes live in :mod:`fxexpand.pipelines`.
"""

from .augment_width import AugmentWidth
from .decay_activations import DecayActivations
from .extract_base import ExtractBase
from .fold_batchnorm import FoldBatchNorm
from .fuse_linear import FuseLinear
from .grow_width import GrowWidth
from .insert_early_exits import InsertEarlyExits
from .insert_ema_blocks import InsertEMABlocks
from .insert_inverted_residual import InsertInvertedResidual
from .linear_expand import LinearExpand
from .remove_exits import RemoveExits
from .remove_identity import RemoveIdentity
from .restore_original import RestoreOriginal
from .verify import Verify

__all__ = [
    "AugmentWidth",
    "DecayActivations",
    "ExtractBase",
    "FoldBatchNorm",
    "FuseLinear",
    "GrowWidth",
    "InsertEarlyExits",
    "InsertEMABlocks",
    "InsertInvertedResidual",
    "LinearExpand",
    "RemoveExits",
    "RemoveIdentity",
    "RestoreOriginal",
    "Verify",
]
