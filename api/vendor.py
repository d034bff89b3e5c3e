"""The dashboard's graph library, served from the installed package (no CDN: the machine may be offline).

We use vis-network, as the pyvis package ships it (pyvis/lib/vis-<version>/): a maintained library
that draws directed graphs with a hierarchical layout, edge labels and per-node colours, in one
standalone file with no other script to load, and it arrives through PyPI like every other
dependency (dash-cytoscape's file is a Dash/React bundle, not Cytoscape.js alone; Debian has no
graph-layout library packaged). pyvis is never imported: only its files are read, found without
running its module (which would load IPython).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "pyvis"
MISSING = (
    "the dashboard's graph library is not installed: vis-network ships in the pyvis package "
    "(pip install 'pyvis>=0.3.2', a dependency of nova-streams)"
)
_VERSION = re.compile(r"^vis-(\d+(?:\.\d+)*)$")


@dataclass(frozen=True)
class VisNetwork:
    version: str
    script: Path
    stylesheet: Path | None

    @property
    def base(self) -> str:
        """The URL folder its files are served under: versioned, so that a long cache never goes stale."""
        return f"/vendor/vis-network/{self.version}"


def find_vis_network() -> VisNetwork | None:
    """The newest vis-network the installed pyvis ships, or None when pyvis is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    found: list[tuple[tuple[int, ...], VisNetwork]] = []
    for location in spec.submodule_search_locations:
        for folder in (Path(location) / "lib").glob("vis-*"):
            match = _VERSION.match(folder.name)
            script = folder / "vis-network.min.js"
            if match is None or not script.is_file():
                continue
            css = folder / "vis-network.css"
            version = match.group(1)
            found.append(
                (tuple(int(p) for p in version.split(".")), VisNetwork(version, script, css if css.is_file() else None))
            )
    return max(found, key=lambda pair: pair[0])[1] if found else None
