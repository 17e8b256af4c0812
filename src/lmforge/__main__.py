"""`python -m lmforge`: the command line (`lmforge.cli`)."""

import sys

from lmforge.cli import main

sys.exit(main())
