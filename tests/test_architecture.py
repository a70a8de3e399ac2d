"""The package's shape (tools/check_architecture.py): wings that import only downward, no import circle, no
private name imported across modules, no function over 60 lines. The report is printed (pytest -s shows it)."""

import importlib.util
import os
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checker():
    spec = importlib.util.spec_from_file_location("check_architecture",
                                                  os.path.join(REPO, "tools", "check_architecture.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_keeps_its_shape():
    report, broken = _checker().check(os.path.join(REPO, "moslora_ext"))
    print("\n".join(report))
    assert broken == 0, "\n".join(report)


def test_the_checker_finds_what_breaks_the_rules(tmp_path):
    """A toy package with one of each broken rule: the checker must see every one."""
    package = tmp_path / "pkg"
    for wing in ("ops", "layers"):
        (package / wing).mkdir(parents=True)
        (package / wing / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "ops" / "a.py").write_text("from ..layers.b import thing\n")  # upward
    (package / "layers" / "b.py").write_text(textwrap.dedent("""\
        from ..ops.a import _hidden
        from .c import other


        def thing():
        """) + "    x = 1\n" * 61)
    (package / "layers" / "c.py").write_text("from .b import thing\nother = 1\n")  # circle b <-> c
    report, broken = _checker().check(str(package))
    text = "\n".join(report)
    assert "upward imports: 1" in text and "import circles: 1" in text
    assert "private names imported across modules: 1" in text and "functions over 60 lines: 1" in text
    assert broken == 4
