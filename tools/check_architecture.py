"""The package's shape, checked: prints the facts and exits 1 if any rule is broken.

    python tools/check_architecture.py [PACKAGE_DIR]

Rules for moslora_ext/ (docs/layout.md names the wings):
- each wing imports only the wings below it: ops < layers < model < peft < formats < the package root;
- no import circle between modules (imports inside functions count: they are arrows too);
- no private name (``_name``) imported from another module, and every name imported from where it is defined;
- no function (or method) over 60 lines.
"""

import ast
import os
import sys

WINGS = ("ops", "layers", "model", "peft", "formats")
MAX_FUNCTION_LINES = 60
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package_dir):
    """{dotted module name: (path, ast)} of the package's Python files."""
    package = os.path.basename(package_dir.rstrip("/"))
    found = {}
    for folder, _, files in os.walk(package_dir):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = [package] + os.path.relpath(path, package_dir)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                with open(path) as f:
                    found[".".join(parts)] = (path, ast.parse(f.read(), path))
    return found


def resolve(module, node, is_package):
    """The absolute module an ImportFrom names, from inside ``module``."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(all_modules):
    """[(importer, imported module, name or None, line)] of the package's own imports."""
    package = next(iter(all_modules)).split(".")[0]
    out = []
    for module, (path, tree) in all_modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = resolve(module, node, is_package)
                if not source.startswith(package):
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in all_modules or alias.name in ("_C", "_build_config", "_testing"):
                        out.append((module, submodule, None, node.lineno))
                    else:
                        out.append((module, source, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                out.extend((module, a.name, None, node.lineno) for a in node.names
                           if a.name == package or a.name.startswith(package + "."))
    return out


def wing(module):
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in WINGS else None


def rank(module):
    """The wing's place from the bottom; the root's leaf modules (``_version``) are below every wing."""
    w = wing(module)
    if w is not None:
        return WINGS.index(w)
    return len(WINGS) if module.count(".") == 0 else -1


def defined_names(tree):
    """The names a module defines at its top level (inside its top-level try/if blocks too)."""
    names, nodes = set(), list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.Try, ast.If)):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", [])
                         + [n for h in getattr(node, "handlers", []) for n in h.body])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def circles(arrows):
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {}
    for a, b in arrows:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(all_modules):
    out = []
    for module, (path, tree) in all_modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: {lines} lines")
    return out


def check(package_dir):
    """(report lines, number of broken rules)."""
    all_modules = modules(package_dir)
    edges = imports(all_modules)
    arrows = {(a, b) for a, b, _, _ in edges if a != b and b in all_modules}
    # a package's __init__ importing its own submodules is how it shows its names, not a dependency back
    arrows_no_init = {(a, b) for a, b in arrows if not b.startswith(a + ".")}
    upward = sorted(f"{a} imports {b}" for a, b in arrows if rank(a) < rank(b))
    rings = circles(arrows_no_init)
    private, not_defined = [], []
    for a, b, name, line in edges:
        if name is None or b not in all_modules:
            continue
        if name.startswith("_") and name != "__version__":
            private.append(f"{a}:{line} imports {name} from {b}")
        elif name not in defined_names(all_modules[b][1]) and not all_modules[b][0].endswith("__init__.py"):
            not_defined.append(f"{a}:{line} imports {name} from {b}, which imports it from elsewhere")
    too_long = long_functions(all_modules)
    between_wings = {(wing(a), wing(b)) for a, b in arrows if wing(a) != wing(b)}
    report = [
        f"{len(all_modules)} modules in {len(WINGS)} wings ({' < '.join(WINGS)} < the package root), "
        f"{len(arrows)} import arrows, {len(between_wings)} between wings",
        f"upward imports: {len(upward)}", *("  " + u for u in upward),
        f"import circles: {len(rings)}", *("  " + " <-> ".join(r) for r in rings),
        f"private names imported across modules: {len(private)}", *("  " + p for p in private),
        f"names imported from a module that does not define them: {len(not_defined)}",
        *("  " + n for n in not_defined),
        f"functions over {MAX_FUNCTION_LINES} lines: {len(too_long)}", *("  " + f for f in too_long),
    ]
    return report, len(upward) + len(rings) + len(private) + len(not_defined) + len(too_long)


def main():
    package_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "moslora_ext")
    report, broken = check(package_dir)
    print("\n".join(report))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
