"""`python -m modelyard.cli`: the same as the `modelyard` command."""

import sys

from . import main

sys.exit(main())
