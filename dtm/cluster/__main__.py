"""`python -m dtm.cluster`: see the package's docstring."""

import sys

from dtm.cluster.command import main

sys.exit(main())
