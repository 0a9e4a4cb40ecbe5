"""How rounds execute: fedsim's Grid over a Ray actor pool, or Flower's runtime.

Ray reads these settings when it is first imported, so they are set here, before any
module of this package imports it.
"""

import os

# A privacy tool does not phone home: no Ray usage statistics.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep today's behaviour (and silence Ray's FutureWarning about changing it).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Without this, Ray 2.5x replaces a loopback node address with the machine's external
# address and its servers listen on every interface; with it they bind to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
