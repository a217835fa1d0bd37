"""The GroupMixNorm layer and what a model needs to use it; depends on torch alone.

>>> from groupmixnorm.nn import GroupMixNorm1d, use_groups
"""

from groupmixnorm.nn import functional
from groupmixnorm.nn.convert import convert, torchvision_model
from groupmixnorm.nn.modules import GroupMixNorm1d, GroupMixNorm2d
from groupmixnorm.nn.routing import collect_alignment, current_groups, mix_within, use_groups, use_reference
from groupmixnorm.nn.sync import SyncGroupMixNorm, convert_sync_groupmixnorm

__all__ = [
    "GroupMixNorm1d", "GroupMixNorm2d", "SyncGroupMixNorm", "collect_alignment", "convert",
    "convert_sync_groupmixnorm", "current_groups", "functional", "mix_within", "torchvision_model", "use_groups",
    "use_reference",
]
