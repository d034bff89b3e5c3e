"""The service's name and version, as /health and the OpenAPI schema report them."""

from __future__ import annotations

from importlib import metadata

SERVICE = "NOVA Streams"

try:
    VERSION = metadata.version("nova-streams")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0.0.0"
