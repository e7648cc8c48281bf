"""`python -m loraserve ...`: the same command line as the `loraserve` script."""

import sys

from loraserve.api.cli import main

sys.exit(main())
