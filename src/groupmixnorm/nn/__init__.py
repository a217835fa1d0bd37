"""The GroupMixNorm layer and what a model needs to use it; depends on torch alone.

>>> from groupmixnorm.nn import GroupMixNorm1d, use_groups
"""

from groupmixnorm.nn import functional
from groupmixnorm.nn.modules import GroupMixNorm1d, GroupMixNorm2d
from groupmixnorm.nn.routing import collect_alignment, current_groups, use_groups

__all__ = [
    "GroupMixNorm1d", "GroupMixNorm2d", "collect_alignment", "current_groups", "functional", "use_groups",
]
