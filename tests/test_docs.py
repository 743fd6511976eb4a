"""The documentation cannot rot: the examples of docs/extending.md run, every path and sdekit
name that docs/architecture.md and docs/extending.md mention in backticks exists, and the package
keeps the layering that docs/architecture.md describes.

The examples run in a fresh interpreter (one per document, blocks in order in one namespace), so
a solver they register or a grid they add never reaches the registry the other tests see. A block
whose first line is ``# file: NAME.py`` is a file the reader would create: it is written to a
temporary folder on ``sys.path`` instead of being run.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: ROOT / "docs" / name for name in ("architecture.md", "extending.md")}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_TAG = re.compile(r"# file: (\w+\.py)\n")
#: a generous bound per example block (the examples take well under 2 s on one idle thread; the
#: bound only catches an example that grew into a benchmark)
BLOCK_LIMIT_S = 30.0


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """``(line number of the block's first code line, code)`` of every ```lang block."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == lang]


RUNNER = r"""
import json, sys, time
blocks, doc = json.load(open(sys.argv[1])), sys.argv[2]
# imports happen before the clock starts (assert_close's first call imports more of torch)
import torch, sdekit  # noqa: F401
torch.testing.assert_close(torch.zeros(1), torch.zeros(1))
ns, times = {"__name__": "__docs__"}, []
for line, code in blocks:
    t0 = time.perf_counter()
    # pad so that tracebacks show the line numbers of the document
    exec(compile("\n" * (line - 1) + code, doc, "exec"), ns)
    times.append((line, time.perf_counter() - t0))
print("BLOCK-TIMES " + json.dumps(times))
"""


def test_extending_md_has_an_example_for_every_section():
    blocks = fenced_blocks(DOCS["extending.md"], "python")
    text = DOCS["extending.md"].read_text()
    for heading in ("## (a) A solver", "## (b) A forward SDE", "## (c) A prediction kind",
                    "## (d) A time grid", "## (e) A benchmark problem"):
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        section = text[start:end if end >= 0 else None]
        assert "```python" in section, f"no python example under {heading!r}"
    assert len(blocks) >= 5


@pytest.mark.parametrize("doc", [d for d in DOCS if fenced_blocks(DOCS[d], "python")])
def test_python_examples_run(doc, tmp_path):
    blocks = []
    for line, code in fenced_blocks(DOCS[doc], "python"):
        tag = FILE_TAG.match(code)
        if tag:
            (tmp_path / tag.group(1)).write_text(code)
        else:
            blocks.append((line, code))
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
               TMPDIR=str(tmp_path),   # what the examples write stays in this test's folder
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json", f"docs/{doc}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, f"an example of docs/{doc} failed:\n{proc.stderr[-4000:]}"
    times = json.loads(proc.stdout.rsplit("BLOCK-TIMES ", 1)[1])
    assert [t[0] for t in times] == [b[0] for b in blocks], "every block ran, in order"
    slow = [(line, round(s, 1)) for line, s in times if s > BLOCK_LIMIT_S]
    assert not slow, f"docs/{doc}: blocks at lines {slow} (line, seconds) are too slow"


# --------------------------------------------------------------------- names and paths
INLINE = re.compile(r"`([^`\n]+)`")
TOP_DIRS = ("sdekit", "tests", "docs", "benchmarks", "examples")
PATH = re.compile(rf"^({'|'.join(TOP_DIRS)})/[\w./-]*$")
DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: roots of names that are not sdekit's (left unchecked): other libraries, Python's builtins and
#: environment variables
FOREIGN = {"torch", "np", "numpy", "math", "scipy", "torchsde", "torchdiffeq", "diffusers",
           "pytest", "sys", "os", "PYTHONPATH", *dir(builtins)}
#: the documents' names for instances: ``p.alpha`` is a Problem's, ``sde.T`` a ForwardSDE's
INSTANCES = {"p": "Problem", "sde": "ForwardSDE"}


def inline_code(path: Path) -> list[str]:
    """The inline code spans of a document, fenced blocks left out."""
    return INLINE.findall(FENCE.sub("", path.read_text()))


def resolve_sdekit(name: str):
    """``sdekit.a.b.C.d`` -> the object: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def sdekit_index() -> dict[str, list]:
    """Every class, function and constant defined in an sdekit module, by its name."""
    import pkgutil

    import sdekit
    index: dict[str, list] = {}
    for info in pkgutil.walk_packages(sdekit.__path__, "sdekit."):
        try:
            mod = importlib.import_module(info.name)
        except ImportError:   # an optional dependency is missing: its names count as missing
            continue
        index.setdefault(info.name.rsplit(".", 1)[1], []).append(mod)
        for key, val in vars(mod).items():
            if getattr(val, "__module__", info.name) == info.name or key.isupper():
                index.setdefault(key, []).append(val)
    return index


def has_member(obj, attr: str) -> bool:
    """A class attribute, a dataclass field, or an attribute its methods assign to ``self``."""
    if hasattr(obj, attr) or attr in getattr(obj, "__dataclass_fields__", {}):
        return True
    try:
        src = inspect.getsource(obj)
    except (TypeError, OSError):
        return False
    return f"self.{attr} =" in src or f"self.{attr}," in src


def test_names_in_backticks_exist():
    """Backticked repository paths exist; ``sdekit.x.y`` names import; ``Class.member``,
    ``CamelCase``, ``UPPER_CASE``, ``test_...`` and ``function()`` names are defined in sdekit
    (or, for the test lists and test names the documents point to, in the tests). Plain
    lower-case words (option values, attributes), other libraries' names, and the reader's own
    files and names (``my_...``, classes and functions the examples define) are not checked."""
    index = sdekit_index()
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    code = [c for d in DOCS.values() for _, c in fenced_blocks(d, "python")]
    examples = {m for c in code for m in FILE_TAG.findall(c)}   # the reader's files
    own = {m for c in code for m in re.findall(r"^(?:class|def) (\w+)", c, re.MULTILINE)}
    unchecked = FOREIGN | own
    missing = []
    for doc, path in DOCS.items():
        for span in inline_code(path):
            token = span.strip()
            if "my_" in token:
                continue
            if PATH.match(token):
                if not (ROOT / token).exists():
                    missing.append((doc, token, "no such path"))
                continue
            if re.fullmatch(r"[\w-]+\.(py|md)", token):
                if token not in examples and not any(
                        any((ROOT / top).rglob(token)) for top in TOP_DIRS):
                    missing.append((doc, token, "no such file"))
                continue
            name = token.removesuffix("()")
            if not DOTTED.match(name) or name.split(".")[0] in unchecked:
                continue
            root, *rest = name.split(".")
            if rest and root in INSTANCES:
                root = INSTANCES[root]
            elif rest and root[0].islower() and root != "sdekit":
                continue   # another instance expression (``x.shape``)
            if root == "sdekit":
                try:
                    resolve_sdekit(name)
                except (ImportError, AttributeError) as e:
                    missing.append((doc, token, repr(e)))
                continue
            if not (rest or token.endswith("()") or root[0].isupper() or root.startswith("test_")):
                continue
            if root not in index:
                defined = re.search(rf"^(def {root}\b|{root}\s*[:=])", tests_text, re.MULTILINE)
                if not (defined and not rest):
                    missing.append((doc, token, f"{root!r} is not defined in sdekit or tests"))
                continue
            if rest and not any(has_member(obj, rest[0]) for obj in index[root]):
                missing.append((doc, token, f"{root} has no member {rest[0]!r}"))
    assert not missing, "names or paths in the docs that do not exist:\n" + \
        "\n".join(f"  {d}: `{t}`: {why}" for d, t, why in missing)


# ------------------------------------------------------------------------------ layering
#: docs/architecture.md's layer table, bottom up: a module may import its own layer and the
#: layers before it (module-name prefixes; the longest prefix decides)
#: (interop.export loads training checkpoints, so it sits with training; tuned_grid, the file
#: format the driver reads, sits with the driver)
LAYERS = ["sdekit._utils sdekit._io", "sdekit.sde", "sdekit.dynamics.parameterization",
          "sdekit.dynamics sdekit.guidance", "sdekit.grids", "sdekit.noise", "sdekit.solvers",
          "sdekit.integrate sdekit.tuned_grid", "sdekit.analytic",
          "sdekit.likelihood sdekit.inverse",
          "sdekit.interop", "sdekit.models", "sdekit.training sdekit.interop.export",
          "sdekit.distill", "sdekit.bench sdekit.tune",
          "sdekit.cli"]
#: the documented exception: the fno solver imports distill (lazily) to fit or load its operator
LAYER_EXCEPTIONS = {("sdekit.solvers.operator", "sdekit.distill")}


def layer_of(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes.split():
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), rank)
    return None if best is None else best[1]


def sdekit_imports(path: Path, module: str) -> set[str]:
    """The sdekit modules ``path`` imports, at module level or inside functions."""
    import ast
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}   # ``from . import ode``
    return {m for m in out if m == "sdekit" or m.startswith("sdekit.")}


def test_layers_import_only_the_layers_below_them():
    """The rule docs/architecture.md states, checked over every module of the package."""
    bad, unranked = [], []
    for path in sorted((ROOT / "sdekit").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "sdekit":
            continue   # the public API re-exports every layer
        rank = layer_of(module)
        if rank is None:
            unranked.append(module)
            continue
        for imp in sdekit_imports(path, module):
            r = layer_of(imp)
            excepted = any(module == m and (imp == t or imp.startswith(t + "."))
                           for m, t in LAYER_EXCEPTIONS)
            if r is not None and r > rank and not excepted:
                bad.append(f"{module} imports {imp}")
    assert not unranked, (f"modules {unranked} have no layer: add them to LAYERS in "
                          "tests/test_docs.py and to the layer table of docs/architecture.md")
    assert not bad, "imports against the layering of docs/architecture.md:\n  " + "\n  ".join(bad)


def test_the_subpackages_the_readme_names_resolve_after_a_bare_import():
    """README writes `sdekit.models.wrap(...)` and `sdekit.interop.to_diffusers(...)` after
    `import sdekit`: they load on first use (a fresh interpreter, so nothing imported them)."""
    code = ("import sys, sdekit; assert 'sdekit.models' not in sys.modules; "
            "print(callable(sdekit.models.wrap), callable(sdekit.interop.to_diffusers), "
            "callable(sdekit.training.Trainer))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.split() == ["True", "True", "True"]
