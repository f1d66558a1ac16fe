"""One exception family for the whole library; each class carries the CLI's exit status.

- :class:`DptabError` (exit 1): something went wrong while working — a bug, a failed check of
  our own output, an inconsistent run directory. The run stops; nothing partial is published.
- :class:`InputError` (exit 2): what the user handed us is wrong — data, config, spec, strategy,
  paths. Raised before anything ran (or before any budget was reserved, where it can be).
- :class:`RefusedError` (exit 2): the request is well formed but refused — it would overspend
  the privacy budget, overwrite a release, or show confidential figures.

Wings subclass these (``ConfigError(InputError)``, ``BudgetExceededError(RefusedError)``, ...),
so the CLI and the Prefect flow map any library error to its status by ``exit_status`` alone.
The mixins (``ValueError``, ``RuntimeError``, ``PermissionError``) keep the classes catchable
by the builtin category they always belonged to.
"""

from __future__ import annotations


class DptabError(Exception):
    """Base of every error the library raises on purpose."""

    exit_status: int = 1


class InputError(DptabError, ValueError):
    """The user's data, config, spec, strategy or paths are invalid (exit 2)."""

    exit_status = 2


class ConfigurationError(InputError):
    """A configuration file (run config, strategy, spec, tables, geolevels) is invalid."""


class RefusedError(DptabError, RuntimeError):
    """A valid request that the library refuses: overspend, overwrite, confidentiality (exit 2)."""

    exit_status = 2
