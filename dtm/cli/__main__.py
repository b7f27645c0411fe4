"""`python -m dtm.cli`: see the package's docstring."""

import sys

from dtm.cli.parser import main

sys.exit(main())
