"""`python -m weightstream`: the weightstream command."""
import sys

from .engine.cli import main

sys.exit(main())
