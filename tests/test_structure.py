"""The package's structure, checked on the source: one import name, imports one way."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYZE = os.path.join(ROOT, "analyze")


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return "gradood." + (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)


def _imports(path):
    """``[(imported module, inside a function)]`` of the gradood modules a file imports."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("gradood."))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                if module.startswith("gradood"):
                    # ``from package import submodule`` imports the submodule
                    subs = [f"{module}.{a.name}" for a in child.names]
                    found.extend((s if os.path.exists(_path_of(s)) else module, in_function) for s in subs)
            visit(child, inner)
    visit(tree, False)
    return found


def _path_of(module):
    parts = module.split(".")[1:]
    base = os.path.join(ROOT, *parts)
    return base + ".py" if os.path.exists(base + ".py") else os.path.join(base, "__init__.py")


def _analyze_files():
    for dirpath, _, files in os.walk(ANALYZE):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_analyze_modules_import_each_other_only_at_the_top():
    """No analyze module imports another inside a function (the registry loads the
    built-in scores with importlib, which is no import statement)."""
    hidden = [(_module_name(p), m) for p in _analyze_files() for m, inside in _imports(p)
              if inside and m.startswith("gradood.analyze")]
    assert hidden == []


def test_the_analyze_import_graph_has_no_circle():
    """Modules as nodes, imports between analyze modules (at the top or inside functions)
    as edges: acyclic. A package's ``__init__`` is the door of its modules and is left out as a target
    (importing ``gradood.analyze.x`` runs it first)."""
    graph = {}
    for path in _analyze_files():
        name = _module_name(path)
        graph[name] = {m for m, _ in _imports(path) if m.startswith("gradood.analyze")
                       and not _path_of(m).endswith("__init__.py") and m != name}
    state = {}

    def cycle_from(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = cycle_from(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = cycle_from(node, [node])
            assert found is None, " -> ".join(found)
    assert len(graph) > 50          # every analyze module and score module was read


def test_the_layers_of_analyze_run_one_way():
    """compute -> data -> text -> files: ``results`` (data) imports no other analyze
    module, ``tables`` (text) imports no file writer, and nothing below the door imports
    the door (``api``) or the writers (``output``, ``report``, ``plots``; among them,
    ``output`` calls ``report``, which calls ``plots``)."""
    imports = {_module_name(p): {m for m, _ in _imports(p)} for p in _analyze_files()}
    writers = {"gradood.analyze.output", "gradood.analyze.report", "gradood.analyze.plots"}
    assert not {m for m in imports["gradood.analyze.results"] if m.startswith("gradood.analyze")}
    assert not imports["gradood.analyze.tables"] & writers
    assert not imports["gradood.analyze.plots"] & {"gradood.analyze.output", "gradood.analyze.report"}
    assert "gradood.analyze.output" not in imports["gradood.analyze.report"]
    for module, used in imports.items():
        if module not in ("gradood.analyze", "gradood.analyze.api"):
            assert "gradood.analyze.api" not in used, module
        if module not in ("gradood.analyze", "gradood.analyze.api", *writers):
            assert not used & writers, module


def test_an_extraction_pass_is_one_declaration(monkeypatch):
    """A pass declared in ``store.schema.EXTRA_PASSES`` is laid out, validated and reported
    missing without another edit of the store."""
    import numpy as np
    from gradood.store import schema
    from gradood.store.recipes import PASSES, missing
    fake = schema.ExtraPass("fake", "fake_recipe", "a perturbed forward", "no fake pass (extract with --score fake)",
                            lambda recipe: {"fake/logits": ("iodin/logits", {})})
    monkeypatch.setitem(schema.EXTRA_PASSES, "fake", fake)
    assert "fake" in PASSES
    attrs = {"hook_sets": {}, "fake_recipe": None}
    assert missing([], ["fake"], attrs) == ["no fake pass (extract with --score fake)"]
    assert missing([], ["fake"], {**attrs, "fake_recipe": {"step": 1}}) == []
    rows = schema.layout(3, 4, {}, {}, {"fake_recipe": {"step": 1}})
    assert rows["fake/logits"] == ((3,), "float32")
    assert "fake/logits" not in schema.layout(3, 4, {}, {}, {})
    assert schema.pass_recipes({"fake_recipe": {"step": 1}, "odin": []}) == {"fake_recipe": {"step": 1}}
    assert np.all([p.attr for p in schema.EXTRA_PASSES.values()])
