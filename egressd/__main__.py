"""``python -m egressd`` is the same entry point as the ``egressd`` script."""

import sys

from egressd.cli import main

if __name__ == "__main__":
    sys.exit(main())
