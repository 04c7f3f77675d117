"""Base class for contraction passes that can be limited to expanded regions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..infra import Pass


@dataclass(kw_only=True)
class ScopedPass(Pass):
    """A pass with ``scope``: ``"all"`` rewrites everywhere, ``"expanded"`` only inside
    :class:`~fxexpand.provenance.ExpandedRegion` containers (target "original" of ``contract``)."""

    scope: Literal["all", "expanded"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("all", "expanded"):
            raise ValueError(f"{type(self).__name__}: scope must be 'all' or 'expanded', got {self.scope!r}")
