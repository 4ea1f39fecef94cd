"""`python -m chainrule ...` runs the `chainrule` command line (see `chainrule.cli`)."""

import sys

from chainrule.cli import main

if __name__ == "__main__":
    sys.exit(main())
