"""Prefect smoke tests: a private PREFECT_HOME set before Prefect is imported, one harness.

Only the tests in this folder import Prefect; everything else tests ``pipeline`` directly.
"""

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="dptab-prefect-home-")
# removed when this test process exits (each left ~6 MB of database in /tmp before: 80 of them
# after a day of `make test`). Registered before Prefect is imported, so it runs after Prefect's
# own exit handlers, which may still write there
atexit.register(shutil.rmtree, _HOME, True)
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
