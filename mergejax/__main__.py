"""``python -m mergejax <command>``: see :mod:`mergejax.cli`."""

import sys

from mergejax.cli import main

sys.exit(main())
