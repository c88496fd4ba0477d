"""`python -m nextserve.cluster.cli ...` runs the `nextserve` command line."""

import sys

from nextserve.cluster.cli.main import main

sys.exit(main())
