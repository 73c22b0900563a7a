"""``python -m qpeft``: the same as the ``qpeft`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
