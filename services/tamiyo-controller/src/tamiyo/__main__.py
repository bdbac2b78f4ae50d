"""`python -m tamiyo`: run the Tamiyo controller service (see tamiyo.service)."""

import sys

from tamiyo.service import main

if __name__ == "__main__":
    sys.exit(main())
