"""`python -m lingua.checkpoint consolidate <ckpt_dir> <out_dir>`: one plain file from a DCP checkpoint."""
import sys

from lingua.checkpoint.weights import main

main(sys.argv[1:])
