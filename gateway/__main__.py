"""`python -m gateway` is the `isthmus` command."""

import sys

from gateway.cli import main

sys.exit(main())
