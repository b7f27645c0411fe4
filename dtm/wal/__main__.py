"""`python -m dtm.wal dump PATH`: inspect a log without changing it."""

import sys

from dtm.wal.dump import main

sys.exit(main())
