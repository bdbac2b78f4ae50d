"""`python -m karn`: run the Karn feedback service (see karn.service); `python -m karn verdict`:
the guarded rollout's decision (see karn.verdict)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["verdict"]:
        from karn.verdict import main as verdict
        sys.exit(verdict(sys.argv[2:]))
    from karn.service import main
    sys.exit(main())
