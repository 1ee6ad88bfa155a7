"""``python -m fisherlab`` runs the CLI."""

import sys

from fisherlab.cli import main

sys.exit(main())
