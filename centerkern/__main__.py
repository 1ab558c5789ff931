"""``python -m centerkern``: the command line (``centerkern._cli.main``)."""

from ._cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
