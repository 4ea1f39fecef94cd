"""`python -m compare`: the side-by-side table; exits 1 on any mismatch."""

import sys

from compare.suite import main

if __name__ == "__main__":
    sys.exit(main())
