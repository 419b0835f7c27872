"""The router's one parser of latitude/longitude (Consul Meta and the location header), and
its distances."""

import pytest

from cloud_router.geo import great_circle_km, latitude, longitude, parse_location


@pytest.mark.parametrize("value, lat, lon", [
    ("52.52", 52.52, 52.52), (13.4, 13.4, 13.4), ("-90", -90.0, -90.0),
    ("91", None, 91.0), ("-180.5", None, None), ("", None, None), (None, None, None),
    ("north", None, None), ("nan", None, None), ("inf", None, None),
])
def test_latitude_and_longitude_accept_only_finite_degrees_in_range(value, lat, lon):
    assert latitude(value) == lat and longitude(value) == lon


def test_parse_location_names_the_problem():
    assert parse_location(" 48.85 , 2.35 ") == (48.85, 2.35)
    for text in ("north pole", "1,2,3", "48.85", "a,b"):
        with pytest.raises(ValueError, match="expected 'lat,lon'"):
            parse_location(text)
    for text in ("91,0", "0,181", "inf,0"):
        with pytest.raises(ValueError, match="latitude must be within"):
            parse_location(text)


def test_great_circle_distance():
    assert great_circle_km(48.86, 2.35, 51.51, -0.13) == pytest.approx(344, abs=2)  # Paris-London
    assert great_circle_km(10, 20, 10, 20) == 0
