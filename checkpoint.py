"""The checkpoint file, written and read here only: its format and every version of it (old ones
upgraded through constants frozen here, never through today's defaults), safe loading with the
fallback to the previous file, and rebuilding the model. How bytes reach the disk safely is
files.py's; the folder a run writes, its lock and who may write there, folders.py's."""
import pickle
import re
import sys
from pathlib import Path

import torch

from cli import UserError, first_line
from config import misfit
from diffusion import Diffusion, DiffusionConfig
from files import atomic_save
from samplers import SamplerConfig
from unet import UNet, UNetConfig, planned_parameters

SHIPPED = Path(__file__).resolve().parent / "pretrained" / "fashion-mnist.pt"  # slim_checkpoint()
FORMAT = "ddpm-fashion-mnist"  # stored in every checkpoint; anything else is not ours
VERSION = 11  # bumped whenever what a checkpoint holds changes; _upgrade() reads every older one
CHECKPOINT_NAMES = ("ckpt.pt", "ckpt.prev.pt")  # newest first
REQUIRED = ("model", "ema", "config", "step", "epoch")  # to sample; resuming needs RESUME too
RESUME = ("optimizer", "ema_updates", "history", "timestep_history")
# A distilled student's record (distill.py); None for every trained model. Its sampler is a
# SamplerConfig's dict, the student's step count among it.
DISTILLED = ("sampler", "round", "from_steps", "to_steps", "guidance", "source", "teacher")


# ---------------------------------------------------------------------------- writing

def save_checkpoint(ckpt, folder):
    """Write folder/ckpt.pt atomically, keeping the one it replaces as ckpt.prev.pt."""
    newest, previous = (Path(folder) / name for name in CHECKPOINT_NAMES)
    return atomic_save(ckpt, newest, previous=previous)


def make_checkpoint(part, diffusion, train_config, state, world_size, importance=None,
                    distillation=None, others=()):
    """Everything needed to rebuild the model (configs as plain types) and to resume exactly.
    part: the training.Part trained (model, Adam, EMA); state: the loop's (step, epoch, history).
    Random draws need no saved state: the loop derives each step's from (seed, step, rank).
    importance: L_vlb's timestep sampler, whose history resuming needs. distillation: a distilled
    student's record (distill.py): its sampler, its round, and its teacher, weights included.
    others: the method's other training.Parts (a critic), whose weights and Adam state resuming
    needs and sampling does not.
    """
    model, ema = part.model, part.ema
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(),
            "optimizer": part.optimizer.state_dict(),
            "ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged),
            "step": state["step"], "epoch": state["epoch"], "history": state["history"],
            "timestep_history": importance.state_dict() if importance else None,
            "config": {"model": model.config.to_dict(), "diffusion": diffusion.config.to_dict(),
                       "train": train_config},
            "world_size": world_size,  # data order and steps depend on the process count
            "guide": ema.kept,  # autoguidance's guide: the EMA early in the run, or None
            "distillation": distillation,
            "parts": [{"model": o.model.state_dict(), "optimizer": o.optimizer.state_dict()}
                      for o in others]}


def slim_checkpoint(ckpt, dtype=torch.float16):
    """What drawing needs of a checkpoint, as the repo ships one: its EMA and guide in `dtype`
    (fp16: 3 more mantissa bits than bf16, ample range); nothing to resume a run from."""
    def cast(weights):
        return weights and {k: v.to(dtype) if v.is_floating_point() else v
                            for k, v in weights.items()}
    return {**{k: v for k, v in ckpt.items() if k not in RESUME}, "model": {}, "parts": [],
            "ema": cast(ckpt["ema"]), "guide": cast(ckpt["guide"])}


# ---------------------------------------------------------------------------- reading

def resolve_checkpoint(path):
    """A checkpoint file, or a folder's newest (ckpt.pt; ckpt.prev.pt if a save was cut short)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        raise UserError(f"no checkpoint in {path}/ (it holds: {', '.join(found) or 'nothing'}); "
                        f"train one with `python train.py` or pass --checkpoint PATH")
    raise UserError(f"checkpoint {path} does not exist; train one with `python train.py` or pass "
                    f"--checkpoint PATH")


class Damaged(UserError):
    """The file cannot be what it claims: unreadable, cut short, or missing parts. A damaged ckpt.pt
    gives way to the ckpt.prev.pt beside it; other refusals (foreign, newer, non-finite) do not."""


def _read(path):
    """torch.load with weights_only (tensors and plain data, never code), onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # how torch names a callable the file wants to import
        if code:
            raise UserError(f"refusing {path}: it asks to run {code[1]}, which weights_only "
                            f"loading never does; load only checkpoints made by train.py") from None
        raise Damaged(f"cannot read checkpoint {path} (damaged or not a checkpoint): "
                      f"not a valid pickle") from None
    except Exception as e:  # truncated, not a zip, not a torch file: all mean the file is unusable
        raise Damaged(f"cannot read checkpoint {path} (damaged or not a checkpoint): "
                      f"{first_line(e, 100)}") from None


# What older versions left out, frozen as they were: later defaults must never change how an old
# file reads. Each entry is what every run of that version did.
V1_TRAIN = {"grad_clip": 0.0, "cond_drop": 0.1}  # fields added to version 1 over time
V1_PER_COMMAND = ("max_steps", "max_minutes", "compile")  # kept in version-1 files, not since
V1_CHANNEL_MULTS, V1_IMAGE_SIZE = (1, 2, 2), 28
V2_DIFFUSION = {"variance": "fixed_small", "loss": "simple"}  # Ho et al.'s, before Improved DDPM
V3_TRAIN = {"steps": 0, "lr_schedule": "constant", "ema_power": 8.0, "memory_format": "contiguous"}
V5_STUDENT_SAMPLER = {"sampler": "ddim", "eta": 0.0, "spacing": "even"}  # every version-5 student's
V7_TRAIN = {"plan_minutes": 0.0, "planned_rate": 0.0}  # no run's length was planned in fixed steps
V8_TRAIN = {"guide_fraction": 0.0}  # no run kept an early EMA


def _from_v1(ckpt):
    """2 dropped the RNG state and the per-command limits, and versions the format."""
    train = {**V1_TRAIN, **ckpt["config"].get("train", {})}
    for key in V1_PER_COMMAND:
        train.pop(key, None)
    # "auto" (bf16 on CUDA, fp32 elsewhere, for a while) becomes fp32: --precision bf16 brings it back.
    train["precision"] = "bf16" if train.get("precision") == "bf16" else "fp32"
    model = dict(ckpt["config"]["model"])
    if "attn_resolutions" in model:  # sizes the network lacks were once accepted and had no effect
        levels = len(model.get("channel_mults", V1_CHANNEL_MULTS))
        sizes = [model.get("image_size", V1_IMAGE_SIZE) // 2**k for k in range(levels)]
        model["attn_resolutions"] = tuple(r for r in model["attn_resolutions"] if r in sizes)
    config = {**ckpt["config"], "model": model, "train": train}
    kept = {k: v for k, v in ckpt.items() if k != "rng"}
    return {**kept, "format": FORMAT, "config": config, "world_size": ckpt.get("world_size", 1)}


def _from_v2(ckpt):
    """3 added Improved DDPM's variances and losses; before, every run was Ho et al.'s."""
    config = ckpt["config"]
    ckpt = {**ckpt, "config": {**config, "model": {**config["model"], "learned_variance": False},
                               "diffusion": {**config["diffusion"], **V2_DIFFUSION}}}
    if "optimizer" in ckpt:  # a resumable one: it had no timestep history, as loss simple keeps none
        ckpt["timestep_history"] = None
    return ckpt


def _with_train_fields(ckpt, frozen):
    """ckpt with the training-config fields its version lacked, as every run of it had them."""
    config = ckpt["config"]
    return {**ckpt, "config": {**config, "train": {**frozen, **config["train"]}}}


def _from_v5(ckpt):
    """6 records a student's sampler; every version-5 student sampled with the same one."""
    record = ckpt.get("distillation")
    if isinstance(record, dict):
        ckpt = {**ckpt, "distillation": {"sampler": V5_STUDENT_SAMPLER, **record}}
    return ckpt


def _from_v6(ckpt):
    """7 records a student's sampler as a SamplerConfig, its step count inside ("spacing" is its
    grid); a model trained as usual is unchanged."""
    record = ckpt.get("distillation")
    if isinstance(record, dict) and isinstance(record.get("sampler"), dict):
        old, steps = dict(record["sampler"]), record.get("steps")
        sampler = {"sampler": old.get("sampler"), "steps": steps, "eta": old.get("eta"),
                   "grid": old.get("spacing")}
        kept = {k: v for k, v in record.items() if k != "steps"}
        ckpt = {**ckpt, "distillation": {**kept, "sampler": sampler}}
    return ckpt


def _from_v10(ckpt):
    """11 gave DMD the regression term, off in every earlier run, and its record the anchor."""
    record = ckpt.get("distillation")  # a file without one is refused after the upgrades
    if isinstance(record, dict) and isinstance(record.get("matching"), dict):
        ckpt = {**ckpt, "distillation": {**record, "anchor": None,
                                         "matching": {"anchor": 0.0, **record["matching"]}}}
    return ckpt


# version v -> v + 1, for each v
UPGRADES = {1: _from_v1, 2: _from_v2,
            # 4 added the learning-rate decay, the EMA's power, steps and the memory format
            3: lambda ckpt: _with_train_fields(ckpt, V3_TRAIN),
            # 5 added distilled students; every earlier checkpoint is a model trained as usual
            4: lambda ckpt: {**ckpt, "distillation": None},
            5: _from_v5, 6: _from_v6,
            # 8 plans a run's length in fixed step counts and records the rate it measured
            7: lambda ckpt: _with_train_fields(ckpt, V7_TRAIN),
            # 9 keeps an early EMA of the run, autoguidance's guide; no earlier run kept one
            8: lambda ckpt: {**_with_train_fields(ckpt, V8_TRAIN), "guide": None},
            # 10 keeps the networks a method trains beside the model (a critic); none did before
            9: lambda ckpt: {**ckpt, "parts": []},
            10: _from_v10}


def _version(ckpt, path):
    """The format version of a checkpoint of this project; a newer or foreign one is refused."""
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, "ddpm-fashion-mnist/1"):
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT!r})")
    version = 1 if ckpt["format"] == "ddpm-fashion-mnist/1" else ckpt.get("version")
    if not isinstance(version, int) or version < 1:
        raise Damaged(f"checkpoint {path} is damaged: its format version is {version!r}, not a "
                      f"number from 1 up")
    if version > VERSION:
        raise UserError(f"{path} is checkpoint version {version}, and this code reads versions "
                        f"1 to {VERSION}: update this repository (git pull) to read it")
    return version


def _complete(ckpt, path, version):
    """Refuse a file that lacks what every version holds, or whose weights or configs are not tables."""
    missing = sorted(set(REQUIRED) - set(ckpt))
    if missing:
        raise Damaged(f"checkpoint {path} (version {version}) is incomplete: it lacks "
                      f"{', '.join(missing)}")
    config = ckpt["config"]
    tables = (ckpt["model"], ckpt["ema"],
              *((config.get(k, {}) for k in ("model", "diffusion", "train"))
                if isinstance(config, dict) else [None]))
    if not all(isinstance(t, dict) for t in tables):
        raise Damaged(f"checkpoint {path} (version {version}) is damaged: its weights or config "
                      f"are not tables")
    if not all(type(ckpt[k]) is int and ckpt[k] >= 0 for k in ("step", "epoch")):
        raise Damaged(f"checkpoint {path} (version {version}) is damaged: its step and epoch "
                      f"({ckpt['step']!r}, {ckpt['epoch']!r}) are not counts")


def _check_student(record, path, timesteps):
    """A distilled student's record must hold every DISTILLED field and a sampler this code knows."""
    if record is None:
        return
    if not (isinstance(record, dict) and all(k in record for k in DISTILLED)):
        raise Damaged(f"checkpoint {path} is damaged: its distillation record lacks some of "
                      f"{', '.join(DISTILLED)}")
    try:
        sampler = SamplerConfig(**record["sampler"])
        if sampler.steps is None or sampler.grid is None:
            raise ValueError("a student's sampler names its step count and its grid")
        if sampler.steps > timesteps:
            raise ValueError(f"{sampler.steps} steps of a diffusion of {timesteps}")
    except (TypeError, ValueError) as e:
        raise Damaged(f"checkpoint {path} is damaged: its student's sampler "
                      f"{record['sampler']!r} is not one this code knows "
                      f"({first_line(e, 100)})") from None


def _upgrade(ckpt, path):
    """The checkpoint in today's layout, from any version this code knows, one version at a time."""
    version = _version(ckpt, path)
    _complete(ckpt, path, version)
    for v in range(version, VERSION):
        ckpt = {**UPGRADES[v](ckpt), "version": v + 1}
    if "distillation" not in ckpt:
        raise Damaged(f"checkpoint {path} (version {version}) is incomplete: it lacks its "
                      f"distillation record")
    _check_student(ckpt["distillation"], path, ckpt["config"]["diffusion"].get("timesteps", 1000))
    if not isinstance(ckpt.get("guide"), (dict, type(None))) or not (
            isinstance(ckpt.get("parts"), list)
            and all(isinstance(p, dict) and isinstance(p.get("model"), dict)
                    for p in ckpt["parts"])):
        raise Damaged(f"checkpoint {path} is damaged: its guide or other networks' weights are "
                      f"not tables")
    _typed(ckpt, path)
    return ckpt


def _typed(ckpt, path):
    """Refuse a config field, the history or the process count of the wrong type: a string where a
    number goes would fail far from here, in arithmetic, as a traceback."""
    problem = misfit(ckpt["config"])
    if problem:
        raise Damaged(f"checkpoint {path} is damaged: {problem}")
    history, ranks = ckpt.get("history", []), ckpt.get("world_size", 1)
    if not (isinstance(history, list) and all(isinstance(h, (list, tuple)) and len(h) == 3
                                              for h in history)):
        raise Damaged(f"checkpoint {path} is damaged: its loss history is not (step, epoch, "
                      f"loss) rows")
    if not (type(ranks) is int and ranks >= 1):
        raise Damaged(f"checkpoint {path} is damaged: its process count is {ranks!r}")


def _checked(ckpt, path):
    """_upgrade(ckpt), refusing weights (raw or averaged) that hold NaN or Inf: nothing sampled or
    resumed from them could be right."""
    ckpt = _upgrade(ckpt, path)
    parts = [(f"parts[{i}]", p["model"]) for i, p in enumerate(ckpt["parts"])]
    for key, found in [(key, ckpt.get(key)) for key in ("model", "ema", "guide")] + parts:
        bad = next((k for k, v in (found or {}).items()
                    if torch.is_tensor(v) and v.is_floating_point()
                    and not v.isfinite().all()), None)
        if bad:
            raise UserError(f"{path}: its {key} weights hold NaN or Inf (first in {bad}), so "
                            f"nothing can be sampled or resumed from it; use an earlier checkpoint "
                            f"or train again")
    return ckpt


def open_checkpoint(path, fallback=True):
    """(checkpoint, the file it came from). A damaged ckpt.pt gives way to the ckpt.prev.pt beside
    it, with a warning on stderr, when fallback is set; anything else wrong is a UserError."""
    file = resolve_checkpoint(path)
    try:
        return _checked(_read(file), file), file
    except UserError as e:
        previous = file.with_name(CHECKPOINT_NAMES[1])
        if not (fallback and file.name == CHECKPOINT_NAMES[0] and previous.is_file()
                and isinstance(e, Damaged)):
            raise
        ckpt = _checked(_read(previous), previous)
        print(f"warning: {e}; using the previous checkpoint {previous} "
              f"(step {ckpt['step']}) instead", file=sys.stderr)
        return ckpt, previous


def load_checkpoint(path, fallback=True):
    """The checkpoint at path (a file, or a folder's newest), checked and in today's layout."""
    return open_checkpoint(path, fallback)[0]


def restore(ckpt, part, state, importance=None, others=()):
    """Load a checkpoint's training state into a freshly built training.Part (model, Adam, EMA),
    the loop's state dict, for L_vlb the timestep sampler, and the method's other Parts; a
    checkpoint that lacks it or does not fit them is refused in one line."""
    missing = [k for k in RESUME if k not in ckpt]
    if missing:
        raise UserError(f"the checkpoint cannot be resumed: it lacks {', '.join(missing)} "
                        f"(sample.py can still draw from it)")
    try:
        part.ema.module.load_state_dict(ckpt["ema"])
        part.ema.n_averaged.fill_(ckpt["ema_updates"])
        part.ema.kept = ckpt.get("guide")
        if len(ckpt["parts"]) != len(others):
            raise ValueError(f"it keeps {len(ckpt['parts'])} networks beside the model, this "
                             f"method trains {len(others)}")
        for saved, into in [(ckpt, part), *zip(ckpt["parts"], others)]:
            into.model.load_state_dict(saved["model"])
            into.optimizer.load_state_dict(saved["optimizer"])
            for p, kept in into.optimizer.state.items():  # Adam's moments in their parameter's
                for k, v in kept.items():  # memory format, which fused Adam requires and a
                    if torch.is_tensor(v) and v.shape == p.shape:  # resumed run may have changed
                        kept[k] = torch.empty_like(p).copy_(v)
        state.update(step=ckpt["step"], epoch=ckpt["epoch"],
                     history=[tuple(h) for h in ckpt["history"]])
        if (ckpt["timestep_history"] is None) != (importance is None):
            raise ValueError("a timestep history is kept for loss vlb, and only there")
        if importance is not None:
            importance.load_state_dict(ckpt["timestep_history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"the checkpoint does not fit its own config, so it cannot be resumed: "
                        f"{first_line(e, 200)}") from None


def build_model(ckpt, device="cpu", ema=True):
    """Rebuild the U-Net (EMA weights unless ema=False) and diffusion from the checkpoint alone."""
    config, weights = ckpt["config"], ckpt["ema" if ema else "model"]
    if not weights:
        raise UserError("this checkpoint keeps only its EMA weights (a shipped one), not the raw "
                        "ones that --no-ema (or evaluate.py --sweep) asks for")
    try:
        model_config = UNetConfig.from_dict(config["model"])
        wanted, held = (planned_parameters(model_config),
                        sum(v.numel() for v in weights.values() if torch.is_tensor(v)))
        if wanted > held:  # refused before the config's claim is allocated
            raise ValueError(f"the config asks for {wanted:,} parameters, the file holds {held:,}")
        model = UNet(model_config)
        model.load_state_dict(weights)
        diffusion = Diffusion(DiffusionConfig(**config["diffusion"]))
        if model.config.learned_variance != (diffusion.config.variance == "learned"):
            raise ValueError(f"variance {diffusion.config.variance}, "
                             f"learned_variance {model.config.learned_variance}")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint config does not match its weights, or is no longer accepted: "
                        f"{first_line(e, 200)}") from None
    return model.to(device).eval(), diffusion.to(device)


def build_guide(ckpt, device="cpu"):
    """The early EMA a checkpoint keeps as autoguidance's guide (samplers.Autoguided), or None."""
    if ckpt.get("guide") is None:
        return None
    return build_model({"config": ckpt["config"], "ema": ckpt["guide"]}, device)[0]


def teacher_checkpoint(model, diffusion):
    """A model's weights and configs as a distilled checkpoint keeps its teacher (build_teacher)."""
    return {"config": {"model": model.config.to_dict(), "diffusion": diffusion.config.to_dict()},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def build_teacher(ckpt, device="cpu"):
    """The teacher a distilled checkpoint keeps a copy of, rebuilt: (model, diffusion)."""
    teacher = ckpt["distillation"]["teacher"]
    return build_model({"config": teacher["config"], "ema": teacher["weights"]}, device)
