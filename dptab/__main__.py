"""``python -m dptab`` is the ``dptab`` command."""

from dptab.cli import main

main()
