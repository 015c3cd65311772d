"""``python -m polysignal`` is the ``polysignal`` command."""

import sys

from polysignal.cli import main

sys.exit(main())
