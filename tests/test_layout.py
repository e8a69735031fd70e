"""The package's import directions: a stage never imports another stage
(only `stages.artifacts`), the library never imports a stage or a study,
models never import text (the loaders share `models.checkpoint_io`), and no
module reaches into another package's protected names."""

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


def _taiji_modules(path):
  """The taiji_jax modules `path` imports, as dotted names."""
  for module, names in _imports(path):
    if module == "taiji_jax" or module.startswith("taiji_jax."):
      yield from (f"{module}.{n}" for n in names) if names else [module]


STAGES = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py")
                if p.stem not in ("__init__", "artifacts"))


def test_there_is_a_runner_per_stage():
  assert STAGES == ["rl", "sasrec", "sft", "sids"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_never_imports_another_stage(stage):
  path = PACKAGE / "stages" / f"{stage}.py"
  others = {f"taiji_jax.stages.{s}" for s in STAGES if s != stage}
  bad = [m for m in _taiji_modules(path) if m in others or m == "taiji_jax.stages"]
  assert not bad, (stage, bad)
  # The one way in: artifacts.py, which imports no stage itself.
  assert not [m for m in _taiji_modules(PACKAGE / "stages" / "artifacts.py")
              if m.startswith("taiji_jax.stages.") or
              m.startswith("taiji_jax.studies")]


LIBRARY = ("data", "evaluate", "generate", "models", "quantize", "text", "rl",
           "cot", "sidlm", "train")


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_a_stage_or_a_study(package):
  bad = [(p.relative_to(PACKAGE).as_posix(), m)
         for p in sorted((PACKAGE / package).rglob("*.py"))
         for m in _taiji_modules(p)
         if m.startswith(("taiji_jax.stages", "taiji_jax.studies",
                          "taiji_jax.pipeline"))]
  assert not bad, bad


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
