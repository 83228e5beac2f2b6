"""The ``e3rl`` console script: ``e3rl app ...`` starts the workbench, every other subcommand is
``e3rl_core.cli`` (which never imports gradio, so training and eval start without it)."""
from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["app"]:
        from .main import main as app_main

        return app_main(args[1:])
    from e3rl_core.cli import main as core_main

    return core_main(args)


if __name__ == "__main__":
    sys.exit(main())
