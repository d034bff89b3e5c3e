"""Priority lanes: their names, the weights workers share slots by, and how a request says its lane.

Each lane has its own requests stream per shard (shared/streams.py `Keys.in_lane`); consumer/slots.py
says how a worker shares its slots among the lanes.
"""

from __future__ import annotations

from enum import StrEnum


class Lane(StrEnum):
    """A priority lane. `normal` reads and writes the documented requests stream; a lane's stream is its
    name plus `:<lane>` (shared/lua/lib.lua's `lane_stream` derives it the same way)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Highest first: the order in which lanes win a tie for a slot.
LANES = (Lane.HIGH, Lane.NORMAL, Lane.LOW)
_LANE_VALUES = frozenset(lane.value for lane in Lane)


def lane_of(fields: dict[str, str]) -> Lane:
    """The lane a request entry (or task hash) names in its `lane` field; normal without one, or with a
    value that is not a lane (as shared/lua/lib.lua's `lane_stream` reads it)."""
    value = fields.get("lane", "")
    return Lane(value) if value in _LANE_VALUES else Lane.NORMAL


def parse_lane_weights(value: str) -> dict[Lane, int]:
    """`high:4,normal:2,low:1` as a map; every lane must be named once, with a weight from 1 to 100."""
    weights: dict[Lane, int] = {}
    for part in value.replace(" ", "").split(","):
        name, _, weight = part.partition(":")
        if name not in _LANE_VALUES or name in weights or not weight.isdigit() or not 1 <= int(weight) <= 100:
            raise ValueError(
                f"'{value}' is not a list of lane weights: write high:N,normal:N,low:N with each N from 1 to 100"
            )
        weights[Lane(name)] = int(weight)
    if set(weights) != set(Lane):
        raise ValueError(f"'{value}' must give a weight to each of high, normal and low")
    return weights
