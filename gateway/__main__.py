"""`python -m gateway` is the `isthmus` command."""

import sys

from gateway.cli import main

# Guarded: a process started with multiprocessing's spawn (the large-frame inspector)
# imports this module again under another name, and must not run the command line.
if __name__ == "__main__":
    sys.exit(main())
