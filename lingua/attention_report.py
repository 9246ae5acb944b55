"""`python -m lingua.attention_report`: the documented command line; the code is lingua/tools/attention_report.py."""
import sys

from lingua.tools.attention_report import main

if __name__ == "__main__":
    sys.exit(main())
