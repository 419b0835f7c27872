"""Distances between points on the Earth, and the `x-edgegen-location` header's format."""

from __future__ import annotations

import math

EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG)


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in kilometres; accurate to ~0.5%, plenty to rank edges."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def parse_location(text: str) -> tuple[float, float]:
    """``"lat,lon"`` in decimal degrees → (lat, lon); ValueError naming the problem."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected 'lat,lon' in decimal degrees, got {text!r}")
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"expected 'lat,lon' in decimal degrees, got {text!r}") from None
    if not (math.isfinite(lat) and math.isfinite(lon)) or not -90 <= lat <= 90 \
            or not -180 <= lon <= 180:
        raise ValueError(f"latitude must be within ±90 and longitude within ±180, got {text!r}")
    return lat, lon
