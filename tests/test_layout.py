"""One home for each thing: library modules import no script, no script imports another script
(what two scripts share is a library module's job), and every file and function reads in one sitting."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = {"unet", "diffusion", "samplers", "methods", "training", "config", "checkpoint", "data", "figures",
           "metrics", "files", "folders", "cli", "device", "distributed", "matching", "consistency",
           "editing"}
SCRIPTS = {"train", "sample", "evaluate", "bench", "distill"}


def imported(source):
    """The top-level modules the source imports, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def violations(name, source):
    """What the module `name` (of the given source) imports that the layout forbids, as readable strings."""
    kind = "library module" if name in LIBRARY else "script"
    return [f"{kind} {name}.py imports the script {other}.py" for other in sorted(imported(source) & SCRIPTS - {name})]


def test_every_module_is_a_library_or_a_script():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == LIBRARY | SCRIPTS, "classify the new module here: library or script"


@pytest.mark.parametrize("name", sorted(LIBRARY | SCRIPTS))
def test_no_module_imports_a_script(name):
    assert violations(name, (ROOT / f"{name}.py").read_text()) == []


def test_the_rule_catches_what_it_is_for():
    assert violations("data", "from sample import UserError") == ["library module data.py imports the script sample.py"]
    assert violations("evaluate", "from sample import generate") == ["script evaluate.py imports the script sample.py"]
    assert violations("bench", "def f():\n    import train\n    train.setup()") == [
        "script bench.py imports the script train.py"]
    assert violations("evaluate", "from samplers import generate\nimport training\ntraining.train()") == []


def functions(path):
    """(name, lines) of every function and method in the file at path."""
    tree = ast.parse(path.read_text())
    return [(f"{path.name}:{node.name}", node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_every_function_fits_a_screen():
    """About 60 lines at most, docstring included: what does not fit is two ideas."""
    long = [(name, n) for p in ROOT.glob("*.py") for name, n in functions(p) if n > 62]
    assert long == []


def test_no_file_outgrows_a_sitting():
    """Read in one sitting: the aim is about 350 lines a file; this fails past 400, the tests included."""
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in [*ROOT.glob("*.py"),
                                                                                  *ROOT.glob("tests/*.py")]}
    assert max(lengths.values()) <= 400, lengths
