"""The embedded Consul-compatible registry (`edgegen registry`).

The subset of Consul's HTTP API that edgegen uses, with Consul's own paths, parameters,
headers, status codes and JSON field names, so that the agent (py-consul) and the router's
watcher run unchanged against a real Consul in production.

    definitions   request bodies → validated service/check definitions
    state         the pure state machine: services, checks, index, TTL expiry, reaping
    kv            the KV store: entries, indexes, key/value/parameter rules
    params        the blocking-query and flag parameters the read endpoints share
    queries       read queries over the state (health, catalog, coordinates, near)
    views         Consul's JSON shapes
    filtering     the `filter` expressions edgegen uses
    coordinates   network coordinates derived from Meta lat/lon (for `near`)
    checks        one HTTP probe
    journal       the write-ahead JSON-lines file under --data-dir
    runtime       state + clock + journal + check tasks + blocking-query wake-ups
    http          the FastAPI app and `serve()`
"""
