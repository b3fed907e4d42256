"""`python -m daemon.jobctl`, as the tests and `jobd demo` run it."""

import sys

from daemon.jobctl.cli import main

sys.exit(main())
