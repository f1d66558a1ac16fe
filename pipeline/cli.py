"""The ``dptab`` command line. Each command is a thin wrapper over library functions.

Exit status: 0 success, 2 invalid input or configuration (nothing later runs), 1 other errors.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Differentially private tabulation.")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
