"""`python -m longexposure ...`: the `longexposure` command, for environments without the console script."""

import sys

from longexposure.cli import main

sys.exit(main())
