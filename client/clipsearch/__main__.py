"""Lets ``python -m clipsearch`` run the command line."""

import sys

from clipsearch.cli import main

sys.exit(main())
