"""``python -m conec_trio``: the ``conec-trio`` command line."""

import sys

from .cli import main

sys.exit(main())
