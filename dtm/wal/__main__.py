"""`python -m dtm.wal dump PATH`: inspect a log without changing it, as `dtm log dump PATH`
does (a server that refuses a log names this form: it needs no `dtm` on the PATH)."""

import sys

from dtm.wal.dump import main

sys.exit(main())
