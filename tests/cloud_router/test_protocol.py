"""The OpenAI shapes the router writes itself: the type of an error follows its status."""

import json

from cloud_router.protocol import ERROR_TYPES, error_body, sse_error_event


def test_error_bodies_take_their_type_from_the_status():
    assert error_body(401, "no key", code="invalid_api_key") == {"error": {
        "message": "no key", "type": "authentication_error", "param": None,
        "code": "invalid_api_key"}}
    for status, type_ in ERROR_TYPES.items():
        assert error_body(status, "m")["error"]["type"] == type_
    assert error_body(405, "m")["error"]["type"] == "invalid_request_error"
    assert error_body(502, "m")["error"]["type"] == "server_error"


def test_a_broken_stream_ends_with_a_server_error_event():
    event = sse_error_event("it broke")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"] == {"message": "it broke", "type": "server_error",
                                              "param": None, "code": "upstream_stream_broken"}
