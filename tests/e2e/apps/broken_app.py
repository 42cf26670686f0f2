"""An app module that fails to import (tests/e2e/test_apps.py: the error message of a bad --app)."""

raise RuntimeError("testapp: no configuration")
