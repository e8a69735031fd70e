"""The package's import directions: models never import text (the loaders
share `models.checkpoint_io`), and no module reaches into another package's
protected names."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "taiji_jax"


def _imports(path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module, [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, []


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")),
                         ids=lambda p: p.name)
def test_models_do_not_import_text(path):
  for module, names in _imports(path):
    assert not module.startswith("taiji_jax.text"), (path.name, module)
    assert not (module == "taiji_jax" and "text" in names), path.name


def test_no_protected_access_across_modules():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text())
    imported = {
        a.asname or a.name
        for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and
          not node.attr.startswith("__") and
          isinstance(node.value, ast.Name) and node.value.id in imported):
        offenders.append(f"{path.relative_to(PACKAGE)}: "
                         f"{node.value.id}.{node.attr}")
  assert not offenders, offenders


def test_the_registry_names_unknown_entries_and_keeps_defaults():
  from taiji_jax import registry  # pylint: disable=g-import-not-at-top
  r = registry.Registry("widget")
  r.add("a", len, size=3)
  assert r.get("a") is len and r.defaults("a") == {"size": 3}
  r.defaults("a")["size"] = 4  # a copy
  assert r.defaults("a") == {"size": 3}
  with pytest.raises(ValueError, match=r"unknown widget 'b'; known: \['a'\]"):
    r.get("b")
  with pytest.raises(ValueError, match="registered twice"):
    r.add("a", min)
  with r.temporarily("b", max):
    assert r.names() == ["a", "b"]
  assert "b" not in r
