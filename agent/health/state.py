"""The app's health as the agent knows it: one enum, shared by the health tracker (which decides it)
and the registrar (which acts on it). Imports nothing, so any part can use it."""

from __future__ import annotations

import enum


class Health(enum.Enum):
    UNKNOWN = "unknown"        # no verdict yet: the registrar holds what it has
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
