"""`python -m lingua.stool`: the documented command line; the code is lingua/tools/stool.py."""
import sys

from lingua.tools.stool import main

if __name__ == "__main__":
    sys.exit(main())
