"""``python -m qfold``: the command line (see :mod:`qfold.cli`)."""
import sys

from qfold.cli import main

sys.exit(main())
