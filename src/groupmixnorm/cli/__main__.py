"""``python -m groupmixnorm.cli`` runs the command line, as ``python -m groupmixnorm`` does."""

import sys

from groupmixnorm.cli import main

sys.exit(main())
