"""`python -m watcher` is the `virtiofs-reattach` command."""

import sys

from .cli import main

sys.exit(main())
