"""groupmixnorm: train deep models that are fair by construction with the GroupMixNorm layer.

The layer lives in :mod:`groupmixnorm.nn` (torch only); metrics, data, methods, training and the command
line are separate subpackages, imported on demand so that ``import groupmixnorm.nn`` stays light.
"""

__version__ = "0.1.0"
