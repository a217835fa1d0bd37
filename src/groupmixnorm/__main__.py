"""``python -m groupmixnorm`` runs the command line (also under ``torchrun -m groupmixnorm``)."""

import sys

from groupmixnorm.cli import main

sys.exit(main())
