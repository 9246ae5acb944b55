"""`python -m lingua.plot`: the documented command line; the code is lingua/tools/plot.py."""
import sys

from lingua.tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
