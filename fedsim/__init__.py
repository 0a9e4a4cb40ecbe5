"""fedsim: a federated learning simulator and coordinator built on Flower and Ray."""

import os

# A privacy tool does not phone home: Flower telemetry stays off unless the user set it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
