"""Points on the Earth: the one place the router parses latitude and longitude (Consul Meta,
the `x-edgegen-location` header) and measures distances between them."""

from __future__ import annotations

import math

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG)


def _degrees(value, limit: float) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and abs(f) <= limit else None


def latitude(value) -> float | None:
    """Decimal degrees (a number or its text) within ±90; None for anything else."""
    return _degrees(value, 90.0)


def longitude(value) -> float | None:
    """Decimal degrees (a number or its text) within ±180; None for anything else."""
    return _degrees(value, 180.0)


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in kilometres; accurate to ~0.5%, plenty to rank edges."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def parse_location(text: str) -> tuple[float, float]:
    """``"lat,lon"`` in decimal degrees → (lat, lon); ValueError naming the problem."""
    try:
        lat, lon = (float(p.strip()) for p in text.split(","))
    except ValueError:
        raise ValueError(f"expected 'lat,lon' in decimal degrees, got {text!r}") from None
    if latitude(lat) is None or longitude(lon) is None:
        raise ValueError(f"latitude must be within ±90 and longitude within ±180, got {text!r}")
    return lat, lon
