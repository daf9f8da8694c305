"""``python -m parity.speed``."""

import sys

from parity.speed.cli import main

sys.exit(main())
