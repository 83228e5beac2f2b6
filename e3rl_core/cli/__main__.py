"""``python -m e3rl_core.cli`` (and ``torchrun -m e3rl_core.cli``) runs the command line."""
import sys

from . import main

sys.exit(main())
