"""`python -m dtm.chaos`: see the package's docstring."""

import sys

from dtm.chaos.command import main

sys.exit(main())
