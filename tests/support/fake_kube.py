"""A small Kubernetes API server for tests, over real HTTP, following the API's documented
responses for the calls edgegen makes:

- server-side apply: ``PATCH`` with ``Content-Type: application/apply-patch+yaml`` and a
  required ``fieldManager``; field ownership per manager, ``409 Conflict`` (a Status naming the
  conflicting fields and manager) unless ``force=true``; ``415`` for another patch type;
- ``GET`` of an object (``404`` Status ``NotFound``), lists with ``labelSelector`` (equality
  and ``in (...)``) and ``fieldSelector=metadata.name=``, and ``watch=true`` streams of
  ``{"type", "object"}`` lines from a ``resourceVersion``, ended after ``timeoutSeconds``;
- ``403 Forbidden`` Status for (verb, resource) pairs the test forbids;
- the API server's proxy to a Service's or a Pod's port
  (``/api/v1/namespaces/NS/services/NAME:PORT/proxy/...``), forwarded to the URL a test maps
  it to in ``proxies``; ``503 ServiceUnavailable`` when nothing answers there.

A built-in DaemonSet "controller and kubelet" gives an applied edge DaemonSet one pod per
matching node, replaces a pod only when the template changed (its ``controller-revision-hash``
label), and keeps the DaemonSet status (observedGeneration, desiredNumberScheduled,
updatedNumberScheduled, numberReady) current. A pod starts on the bundle its template's
annotation names, or else the one the ``edgegen-bundle`` ConfigMap names when the pod is
created (as the kubelet resolves ``configMapKeyRef`` at container start); pods on a digest in
``bad_digests`` crash-loop (``CrashLoopBackOff``), others become Ready after ``ready_delay``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import httpx
import yaml

DIGEST = "edgegen.io/bundle-digest"
STARTED_ON = "fake.edgegen.io/started-on"   # test-only: the bundle a pod's containers started on
_PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/(services|pods)/(?:https?:)?([^/:]+):(\d+)"
                    r"/proxy(/.*)?$")


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details or {}, "code": code}


def _leaves(obj, prefix=""):
    """Field paths of an object's leaves (lists count as one leaf), e.g. .spec.replicas."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}")
    else:
        yield prefix, obj


def _get_path(obj, path):
    cur = obj
    for part in path.strip(".").split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _match_labels(labels: dict, selector: str | None) -> bool:
    if not selector:
        return True
    labels = labels or {}
    parts, depth, cur = [], 0, ""
    for ch in selector:  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in filter(None, (p.strip() for p in parts)):
        if " in " in part:
            key, values = part.split(" in ", 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            if labels.get(key.strip()) not in allowed:
                return False
        else:
            key, _, value = part.partition("=")
            if labels.get(key.strip()) != value.strip().lstrip("="):
                return False
    return True


class FakeKube:
    """The server; ``url`` once started. Tests set nodes, bad digests and forbidden verbs."""

    def __init__(self, nodes: list[dict] | None = None, ready_delay: float = 0.2):
        self.objects: dict[tuple[str, str], dict] = {}   # (collection path, name) -> object
        self.owners: dict[tuple[str, str], dict] = {}    # -> {field path: manager}
        self.rv = 100
        self.cond = threading.Condition()
        self.events: list[tuple[int, str, str, dict]] = []  # (rv, collection, type, obj)
        self.requests: list[dict] = []
        self.forbidden: set[tuple[str, str]] = set()     # (verb, plural)
        self.bad_digests: set[str] = set()
        self.proxies: dict[tuple[str, str, str, int], str] = {}   # (plural, ns, name, port)
        self.ready_delay = ready_delay
        self.nodes = nodes or []
        for n in self.nodes:
            self._store("/api/v1/nodes", n["metadata"]["name"], n, "ADDED")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "FakeKube":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path) -> str:
        """Write a kubeconfig pointing at this server (token auth) and return its path."""
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
        }
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
        return str(path)

    # -- state --------------------------------------------------------------------------

    def obj(self, collection: str, name: str) -> dict | None:
        with self.cond:
            o = self.objects.get((collection, name))
            return copy.deepcopy(o) if o else None

    def _store(self, collection: str, name: str, obj: dict, etype: str) -> dict:
        with self.cond:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[(collection, name)] = obj
            self.events.append((self.rv, collection, etype, copy.deepcopy(obj)))
            self.cond.notify_all()
            return copy.deepcopy(obj)

    def set_owner(self, collection: str, name: str, field: str, manager: str) -> None:
        """Make ``manager`` (e.g. kubectl) own a field, to provoke an apply conflict."""
        with self.cond:
            self.owners.setdefault((collection, name), {})[field] = manager

    # -- server-side apply ----------------------------------------------------------------

    def apply(self, collection: str, name: str, patch: dict, manager: str, force: bool):
        key = (collection, name)
        with self.cond:
            current = self.objects.get(key)
            owners = self.owners.setdefault(key, {})
            conflicts = []
            for path, value in _leaves(patch):
                owner = owners.get(path)
                if owner and owner != manager and current is not None \
                        and _get_path(current, path) != value:
                    conflicts.append((path, owner))
            if conflicts and not force:
                msg = f"Apply failed with {len(conflicts)} conflict" + \
                      ("s" if len(conflicts) > 1 else "") + ": " + "\n".join(
                          f'conflict with "{o}": {p}' for p, o in conflicts)
                return 409, _status(409, "Conflict", msg, {
                    "name": name, "causes": [{"reason": "FieldManagerConflict",
                                              "message": f'conflict with "{o}"', "field": p}
                                             for p, o in conflicts]})
            for path, _ in _leaves(patch):
                owners[path] = manager
            if current is None:
                obj = copy.deepcopy(patch)
                meta = obj["metadata"]
                meta.update(uid=str(uuid.uuid4()), generation=1,
                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
                stored = self._store(collection, name, obj, "ADDED")
                code = 201
            else:
                obj = _merge(current, patch)
                if obj.get("spec") != current.get("spec"):
                    obj["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
                stored = self._store(collection, name, obj, "MODIFIED")
                code = 200
        if obj.get("kind") == "DaemonSet":
            threading.Timer(0.05, self._reconcile_daemonset, (collection, name)).start()
        return code, stored

    # -- the DaemonSet controller and kubelet -------------------------------------------------

    def _reconcile_daemonset(self, collection: str, name: str) -> None:
        ds = self.obj(collection, name)
        if ds is None:
            return
        ns = ds["metadata"]["namespace"]
        tmpl = ds["spec"]["template"]
        revision = hashlib.sha256(json.dumps(tmpl, sort_keys=True).encode()).hexdigest()[:10]
        selector = tmpl["spec"].get("nodeSelector") or {}
        nodes = [n for n in self.nodes
                 if all(n["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
        digest = (tmpl["metadata"].get("annotations") or {}).get(DIGEST) or \
            ((self.obj(f"/api/v1/namespaces/{ns}/configmaps", "edgegen-bundle") or {})
             .get("data") or {}).get("bundle.digest", "")
        pods_coll = f"/api/v1/namespaces/{ns}/pods"
        bad = digest in self.bad_digests
        started = []
        for node in nodes:
            node_name = node["metadata"]["name"]
            pod_name = f"{name}-{node_name}"
            old = self.obj(pods_coll, pod_name)
            if old is not None and old["metadata"]["labels"].get(
                    "controller-revision-hash") == revision:
                continue   # the template did not change: the pod keeps running
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": ns, "uid": str(uuid.uuid4()),
                             "labels": {**(tmpl["metadata"].get("labels") or {}),
                                        "controller-revision-hash": revision},
                             "annotations": {**(tmpl["metadata"].get("annotations") or {}),
                                             STARTED_ON: digest}},
                "spec": {"nodeName": node_name},
                "status": {"phase": "Pending", "podIP": "10.42.0.9",
                           "conditions": [{"type": "Ready", "status": "False"}],
                           "initContainerStatuses": [{"name": "bundle-pull", "restartCount": 0,
                                                      "state": {"running": {}}}],
                           "containerStatuses": [{"name": "agent", "restartCount": 0,
                                                  "state": {"waiting": {"reason": "PodInitializing"}}}]},
            }
            self._store(pods_coll, pod_name, pod, "MODIFIED")
            started.append(pod_name)
        self._set_ds_status(collection, name, ds, len(nodes), len(nodes) - len(started))
        if started:
            time.sleep(self.ready_delay)
        for pod_name in started:
            pod = self.obj(pods_coll, pod_name)
            if pod is None or pod["metadata"]["labels"].get("controller-revision-hash") != revision:
                continue
            st = pod["status"]
            st["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
            st["phase"] = "Running"
            if bad:
                st["containerStatuses"][0].update(restartCount=3, state={"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container=agent"}})
            else:
                st["conditions"] = [{"type": "Ready", "status": "True"}]
                st["containerStatuses"][0].update(state={"running": {}}, ready=True)
            self._store(pods_coll, pod["metadata"]["name"], pod, "MODIFIED")
        ready = sum(1 for node in nodes if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in ((self.obj(pods_coll, f"{name}-{node['metadata']['name']}") or {})
                      .get("status") or {}).get("conditions") or []))
        current = self.obj(collection, name)
        if current and current["metadata"]["generation"] == ds["metadata"]["generation"]:
            self._set_ds_status(collection, name, current, len(nodes), ready)

    def _set_ds_status(self, collection, name, ds, desired, ready):
        with self.cond:
            cur = self.objects.get((collection, name))
            if cur is None or cur["metadata"]["generation"] != ds["metadata"]["generation"]:
                return
            obj = copy.deepcopy(cur)
            obj["status"] = {
                "observedGeneration": ds["metadata"]["generation"],
                "desiredNumberScheduled": desired, "currentNumberScheduled": desired,
                "updatedNumberScheduled": desired, "numberReady": ready,
                "numberAvailable": ready, "numberUnavailable": desired - ready,
                "numberMisscheduled": 0,
            }
            self._store(collection, name, obj, "MODIFIED")

    # -- HTTP -----------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                u = urlparse(self.path)
                q = {k: v[-1] for k, v in parse_qs(u.query).items()}
                parts = u.path.strip("/").split("/")
                # /api/v1/[namespaces/ns/]plural[/name] or /apis/g/v/[namespaces/ns/]plural[/name]
                head = 2 if parts[0] == "api" else 3
                rest = parts[head:]
                if rest[:1] == ["namespaces"] and len(rest) >= 3:
                    coll_parts, rest = parts[:head + 3], rest[3:]
                else:
                    coll_parts, rest = parts[:head + 1], rest[1:]
                collection = "/" + "/".join(coll_parts)
                name = rest[0] if rest else None
                if collection == "/api/v1/namespaces" and name is None and len(parts) > head + 1:
                    name = parts[head + 1]
                return collection, name, q

            def _authorized(self, verb, collection, plural=None):
                plural = plural or collection.rsplit("/", 1)[-1]
                if self.headers.get("Authorization") != "Bearer test-token":
                    self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                    return False
                if (verb, plural) in fake.forbidden:
                    group = collection.split("/")[2] if collection.startswith("/apis/") else ""
                    ns = collection.split("/namespaces/")[1].split("/")[0] \
                        if "/namespaces/" in collection else ""
                    msg = (f'{plural} is forbidden: User "system:serviceaccount:ci:deployer" '
                           f'cannot {verb} resource "{plural}" in API group "{group}"'
                           + (f' in the namespace "{ns}"' if ns else " at the cluster scope"))
                    self._send(403, _status(403, "Forbidden", msg))
                    return False
                return True

            def _proxy(self) -> bool:
                """The API server's proxy to a Service or Pod port; True when it answered."""
                m = _PROXY.match(urlparse(self.path).path)
                if not m:
                    return False
                ns, plural, name, port, rest = m.groups()
                fake.requests.append({"method": self.command, "path": self.path, "query": {}})
                verb = {"GET": "get", "PUT": "update", "DELETE": "delete"}[self.command]
                if not self._authorized(verb, f"/api/v1/namespaces/{ns}/{plural}",
                                        f"{plural}/proxy"):
                    return True
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = fake.proxies.get((plural, ns, name, int(port)))
                query = urlparse(self.path).query
                try:
                    if target is None:
                        raise httpx.ConnectError("no endpoints")
                    r = httpx.request(self.command, target + (rest or "/")
                                      + (f"?{query}" if query else ""), content=body,
                                      headers={k: v for k, v in self.headers.items()
                                               if k.lower() in ("x-consul-token",
                                                                "content-type")},
                                      timeout=600)
                except httpx.HTTPError:
                    self._send(503, _status(503, "ServiceUnavailable",
                                            f'no endpoints available for {plural[:-1]} "{name}"'))
                    return True
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-type", "x-consul-index", "x-consul-knownleader",
                                     "x-consul-lastcontact"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)
                return True

            def do_PUT(self):
                if not self._proxy():
                    self._send(405, _status(405, "MethodNotAllowed", "PUT is not supported"))

            def do_DELETE(self):
                if not self._proxy():
                    self._send(405, _status(405, "MethodNotAllowed", "DELETE is not supported"))

            def do_PATCH(self):
                collection, name, q = self._route()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                ctype = self.headers.get("Content-Type", "")
                fake.requests.append({"method": "PATCH", "path": self.path, "query": q,
                                      "content_type": ctype})
                if not self._authorized("patch", collection):
                    return
                if ctype.split(";")[0].strip() != "application/apply-patch+yaml":
                    return self._send(415, _status(415, "UnsupportedMediaType",
                                                   f"the body of the request was in an unknown "
                                                   f"format - accepted media types include: "
                                                   f"application/apply-patch+yaml"))
                if not q.get("fieldManager"):
                    return self._send(400, _status(400, "BadRequest",
                                                   "PatchOptions.meta.k8s.io \"\" is invalid: "
                                                   "fieldManager: Required value: is required "
                                                   "for apply patch"))
                try:
                    patch = yaml.safe_load(body)
                except yaml.YAMLError as exc:
                    return self._send(400, _status(400, "BadRequest", f"error decoding YAML: {exc}"))
                if (patch.get("metadata") or {}).get("name") != name:
                    return self._send(400, _status(400, "BadRequest",
                                                   "the name of the object does not match the "
                                                   "name on the URL"))
                code, out = fake.apply(collection, name, patch, q["fieldManager"],
                                       q.get("force") == "true")
                self._send(code, out)

            def do_GET(self):
                if self._proxy():
                    return
                collection, name, q = self._route()
                fake.requests.append({"method": "GET", "path": self.path, "query": q})
                if not self._authorized("watch" if q.get("watch") else
                                        ("get" if name else "list"), collection):
                    return
                if name:
                    obj = fake.obj(collection, name)
                    if obj is None:
                        plural = collection.rsplit("/", 1)[-1]
                        group = collection.split("/")[2] if collection.startswith("/apis/") else ""
                        res = f"{plural}.{group}" if group else plural
                        return self._send(404, _status(404, "NotFound",
                                                       f'{res} "{name}" not found',
                                                       {"name": name, "kind": plural}))
                    return self._send(200, obj)
                if q.get("watch") == "true":
                    return self._watch(collection, q)
                with fake.cond:
                    items = [copy.deepcopy(o) for (c, _), o in fake.objects.items()
                             if c == collection and self._selected(o, q)]
                    rv = str(fake.rv)
                self._send(200, {"kind": "List", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": rv}, "items": items})

            def _selected(self, obj, q):
                fs = q.get("fieldSelector", "")
                if fs.startswith("metadata.name=") and obj["metadata"]["name"] != fs.split("=", 1)[1]:
                    return False
                return _match_labels(obj["metadata"].get("labels"), q.get("labelSelector"))

            def _watch(self, collection, q):
                deadline = time.monotonic() + float(q.get("timeoutSeconds", 30))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def emit(etype, obj):
                    line = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()

                with fake.cond:
                    if q.get("resourceVersion"):
                        seen = int(q["resourceVersion"])
                    else:
                        for (c, _), o in fake.objects.items():
                            if c == collection and self._selected(o, q):
                                emit("ADDED", o)
                        seen = fake.rv
                try:
                    while True:
                        with fake.cond:
                            pending = [e for e in fake.events if e[0] > seen]
                            if not pending:
                                left = deadline - time.monotonic()
                                if left <= 0:
                                    break
                                fake.cond.wait(min(left, 0.5))
                                continue
                        for rv, c, etype, o in pending:
                            seen = rv
                            if c == collection and self._selected(o, q):
                                emit(etype, o)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        return Handler


def edge_node(name: str, region: str, zone: str, tier: str = "edge") -> dict:
    """A Node object as the API returns it, with edgegen's tier label and topology labels."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "edgegen.io/tier": tier, "kubernetes.io/hostname": name,
                "topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
