"""What a record or checkpoint says about the software that made it."""

from __future__ import annotations

import platform


def environment_versions() -> dict[str, str]:
    """Versions of the pieces that decide the numbers: Python, torch, numpy, scikit-learn, this package."""
    import numpy
    import sklearn
    import torch

    import groupmixnorm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "groupmixnorm": groupmixnorm.__version__,
        "platform": platform.platform(),
    }
