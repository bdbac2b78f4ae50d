"""`python -m karn`: run the Karn feedback service (see karn.service)."""

import sys

from karn.service import main

if __name__ == "__main__":
    sys.exit(main())
