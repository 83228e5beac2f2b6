"""Bridges to other trainers. Each module imports its trainer lazily, so ``e3rl_core`` imports
without them: ``integrations.trl`` needs the ``trl`` extra (``pip install 'e3rl-workbench[trl]'``)."""
