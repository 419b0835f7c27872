"""The import direction in STYLE.md, checked two ways: import-linter's static contracts, and
a fresh interpreter that imports the serving packages and must not load the export stack."""

import subprocess
import sys

from tests.support.procs import REPO

HEAVY = ("torch", "transformers", "optimum", "exporters", "accelerate", "gguf")


def test_import_linter_contracts_hold():
    lint = str(__import__("pathlib").Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_serving_packages_do_not_load_the_export_stack():
    code = (
        "import sys, pkgutil, importlib\n"
        "import edge_agent, cloud_router\n"
        "for pkg in (edge_agent, cloud_router):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"serving imports pulled in: {r.stdout}"


ROOTS = ("cli", "exporters", "manifests", "edge_agent", "cloud_router")


def _import_cycles() -> list[list[str]]:
    """Strongly connected groups of modules in the import graph of every package, module by
    module (import-linter's acyclic_siblings contract sees packages only). ``from P import x``
    with P a package reads P's ``__init__``, so it counts as importing P, as it does at run
    time; that is how ``exporters/__init__`` → ``pipeline`` → ``validation`` → ``exporters``
    was a cycle."""
    import grimp

    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    packages = {m for m in graph.modules if graph.find_children(m)}
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            edges[importer].add(imported)
            for detail in graph.get_import_details(importer=importer, imported=imported):
                line = detail["line_contents"]
                parent = imported.rpartition(".")[0]
                if parent in packages and line.startswith(f"from {parent} import"):
                    edges[importer].add(parent)
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))
    return cycles


def test_no_import_cycles_anywhere():
    assert _import_cycles() == []
