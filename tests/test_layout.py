"""One home for each thing: library modules import no script, and a script takes from another script only
the job that script exists for (evaluate.py and bench.py measure sample.py's generation and train.py's
loop), never its plumbing (errors, parser, device, checkpoint format, saving)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = {"unet", "diffusion", "samplers", "data", "checkpoint", "cli", "figures", "config"}
SCRIPTS = {"train", "sample", "evaluate", "bench", "distill"}
JOBS = {"sample": {"generate", "draw_pictures"}, "train": {"train", "setup", "measure_rate"}}


def taken(source, module):
    """Names the source takes from `module`: `from module import a, b`, and `module.a` after `import module`."""
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == module:
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Import) and any(a.name == module for a in node.names):
            aliases = {a.asname or a.name for a in node.names if a.name == module}
            names |= {n.attr for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases}
            names.add("<module>")
    return names


def violations(name, source):
    """What the module `name` (of the given source) takes that the rule forbids, as readable strings."""
    found = []
    for other in sorted(SCRIPTS - {name}):
        names = taken(source, other)
        if names and name in LIBRARY:
            found.append(f"library module {name}.py imports the script {other}.py")
        elif names - JOBS.get(other, set()) - {"<module>"}:
            found.append(f"{name}.py takes {sorted(names - JOBS.get(other, set()) - {'<module>'})} from {other}.py")
    return found


def test_every_module_is_a_library_or_a_script():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == LIBRARY | SCRIPTS, "classify the new module here: library or script"


@pytest.mark.parametrize("name", sorted(LIBRARY | SCRIPTS))
def test_imports_follow_the_layout(name):
    assert violations(name, (ROOT / f"{name}.py").read_text()) == []


def test_the_rule_catches_what_it_is_for():
    assert violations("data", "from sample import UserError") == ["library module data.py imports the script sample.py"]
    assert violations("evaluate", "from train import atomic_save") == ["evaluate.py takes ['atomic_save'] from train.py"]
    assert violations("bench", "import train\ntrain.setup()\ntrain.load_checkpoint('x')") == [
        "bench.py takes ['load_checkpoint'] from train.py"]
    assert violations("evaluate", "from sample import generate\nimport train\ntrain.train()") == []


# What a checkpoint of each format version holds. Change a config's fields or the checkpoint's keys, and
# this fails until VERSION is bumped and checkpoint._upgrade() reads the version before (the bug of
# version 1: TrainConfig grew fields under one format string, and older files ended in a KeyError).
LAYOUTS = {2: {
    "keys": ["config", "ema", "ema_updates", "epoch", "format", "history", "model", "optimizer", "step", "version",
             "world_size"],
    "UNetConfig": ["attn_resolutions", "channel_mults", "dropout", "image_size", "in_channels", "num_classes",
                   "num_res_blocks", "width"],
    "DiffusionConfig": ["min_snr_gamma", "prediction", "schedule", "timesteps"],
    "TrainConfig": ["batch_size", "checkpoint_every", "cond_drop", "ema_decay", "epochs", "grad_clip", "log_every",
                    "lr", "precision", "seed", "warmup_steps"],
}}
LAYOUTS[3] = {**LAYOUTS[2], "keys": sorted(LAYOUTS[2]["keys"] + ["timestep_history"]),
              "UNetConfig": sorted(LAYOUTS[2]["UNetConfig"] + ["learned_variance"]),
              "DiffusionConfig": sorted(LAYOUTS[2]["DiffusionConfig"] + ["loss", "variance"])}
LAYOUTS[4] = {**LAYOUTS[3], "TrainConfig": sorted(LAYOUTS[3]["TrainConfig"] + ["ema_power", "lr_schedule",
                                                                            "memory_format", "steps"])}
LAYOUTS[5] = {**LAYOUTS[4], "keys": sorted(LAYOUTS[4]["keys"] + ["distillation"])}
LAYOUTS[6] = LAYOUTS[5]  # a student's distillation record gained its sampler (test_distill.py checks the upgrade)


def test_the_checkpoint_version_changes_with_what_a_checkpoint_holds(good_checkpoint):
    from dataclasses import fields

    import checkpoint
    from config import TrainConfig
    from diffusion import DiffusionConfig
    from unet import UNetConfig

    ckpt = checkpoint.load_checkpoint(good_checkpoint)
    now = {"keys": sorted(ckpt), "UNetConfig": sorted(f.name for f in fields(UNetConfig)),
           "DiffusionConfig": sorted(f.name for f in fields(DiffusionConfig)),
           "TrainConfig": sorted(TrainConfig().recipe())}
    assert now == LAYOUTS[checkpoint.VERSION], "bump checkpoint.VERSION, upgrade the old version, record it here"


def test_no_file_outgrows_a_sitting():
    """Read in one sitting: the aim is about 350 lines a file; this fails past 400, the tests included."""
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in [*ROOT.glob("*.py"),
                                                                                  *ROOT.glob("tests/*.py")]}
    assert max(lengths.values()) <= 400, lengths
