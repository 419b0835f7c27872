"""Network coordinates for `GET /v1/coordinate/nodes` and `?near=`, derived from geography.

Consul learns Vivaldi coordinates from Serf gossip; the embedded registry has no gossip, so
it places each node that registers ``Meta.lat``/``Meta.lon`` on a sphere whose radius is
the Earth's expressed in seconds of round trip through fibre (light covers ~200 km per ms
in glass, and a round trip covers the distance twice). The straight-line distance between
two such points is then a lower bound on their RTT, and clients compute it with Consul's
own formula (coordinate.mdx): ``|Vec_a - Vec_b| + Height_a + Height_b`` (+ adjustments).
"""

from __future__ import annotations

import math

from cloud_router.geo import EARTH_RADIUS_KM, latitude, longitude

FIBRE_KM_PER_S = 200_000.0
MIN_HEIGHT = 1e-5  # Consul's floor for Height (10 µs)
DIMENSIONS = 8


def coordinate_from_location(lat: float, lon: float) -> dict:
    """A Consul ``Coord`` object for a point on the Earth."""
    radius_s = 2 * EARTH_RADIUS_KM / FIBRE_KM_PER_S
    p, lam = math.radians(lat), math.radians(lon)
    vec = [radius_s * math.cos(p) * math.cos(lam), radius_s * math.cos(p) * math.sin(lam),
           radius_s * math.sin(p)] + [0.0] * (DIMENSIONS - 3)
    return {"Vec": vec, "Error": 0.2, "Adjustment": 0.0, "Height": MIN_HEIGHT}


def rtt_seconds(a: dict, b: dict) -> float:
    """Consul's estimated RTT between two coordinates (coordinate.mdx, 'Working with')."""
    dist = math.dist(a["Vec"], b["Vec"]) + a["Height"] + b["Height"]
    adjusted = dist + a["Adjustment"] + b["Adjustment"]
    return adjusted if adjusted > 0 else dist


def location_of(meta: dict) -> tuple[float, float] | None:
    """(lat, lon) from a service's Meta, or None when absent or not numbers in range."""
    lat, lon = latitude(meta.get("lat")), longitude(meta.get("lon"))
    return None if lat is None or lon is None else (lat, lon)
