"""Suite-wide hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable.

- "ci" (default): quick enough that the whole protocol suite stays well under a minute.
- "thorough": for soaking the protocol core before a release (minutes; run it on purpose).

deadline=None everywhere: a property run's duration depends on the machine, and the contracts forbid timing
thresholds in tests.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
