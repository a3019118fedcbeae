"""``python -m topro.cli ...``: the same as ``topro ...``."""
import sys

from topro.cli import main

sys.exit(main())
