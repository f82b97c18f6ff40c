"""The test suite, in layers: unit/, distributed/, cluster/, e2e/ (see conftest.py); helpers/ is
what their tests share. A package, so that tests import helpers as `tests.helpers.X`."""
