"""A training run's settings: TrainConfig, the presets, and how the command's flags, a preset and a
resumed checkpoint combine into the model, diffusion and training configs. The model's and the
diffusion's own settings are UNetConfig (unet.py) and DiffusionConfig (diffusion.py); the sampler's
are SamplerConfig (samplers.py)."""
import argparse
from dataclasses import asdict, dataclass, fields

from cli import UserError, check
from device import fastest_settings
from diffusion import DiffusionConfig
from unet import UNetConfig

# Presets fill in every flag the user did not give. The cpu one is sized so that `make train` ends
# within 30 minutes on the slowest 2-core machine measured (docs/results.md, "The default recipe"):
# a class-conditional model trained for as many steps as 25 minutes allow at the rate measured as
# it starts (plan_minutes), with a decay to 0, the cosine noise schedule and an EMA over about the
# last fifth of the run (power 4), whose value 30% of the way through is kept as autoguidance's
# guide. The gpu one is a larger model trained for longer.
PRESETS = {
    "cpu": dict(width=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                dropout=0.0, num_classes=10, plan_minutes=25.0, batch_size=64, lr=1e-3,
                lr_schedule="cosine", schedule="cosine", ema_power=4.0, guide_fraction=0.3,
                precision="auto", memory_format="auto"),
    "gpu": dict(width=64, channel_mults=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,),
                dropout=0.1, epochs=40, batch_size=128, lr=2e-4, precision="auto",
                memory_format="auto"),
}
# Settings of one command, not of the run: --resume never takes them from the checkpoint.
PER_COMMAND = ("max_steps", "max_minutes", "compile")
# With the model and diffusion, fixed for a run: the data order and the step count depend on them.
FIXED_ON_RESUME = ("batch_size", "seed")
LR_SCHEDULES = ("constant", "cosine", "linear")
# auto: what fastest_settings() picks for the device, stored as fp32 or bf16
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass
class TrainConfig:
    epochs: int = 2
    # optimizer steps in the run; 0: epochs x steps per epoch, unless a plan sets it
    steps: int = 0
    # a new run given no length: the most steps, a multiple of PLAN_STEPS, that train in this many
    # minutes at the rate measured as it starts (training.plan_length); 0: no plan
    plan_minutes: float = 0.0
    # a record, not a setting: training images/s measured when plan_minutes set `steps` (a resumed
    # run may have changed them since); 0: no such plan (--max-minutes's is not recorded here)
    planned_rate: float = 0.0
    batch_size: int = 64
    lr: float = 1e-3
    # after warm-up: constant, or a cosine or linear decay to 0 at the last step
    lr_schedule: str = "constant"
    warmup_steps: int = 200
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    ema_decay: float = 0.999  # the EMA's decay, once its warm-up has reached it
    # EMA warm-up: decay (1 + n) / (ema_power + 2 + n) after n updates (training.EMA)
    ema_power: float = 8.0
    # keep the EMA this far into the planned run, in the checkpoint, as autoguidance's guide
    # (samplers.Autoguided); 0: keep none
    guide_fraction: float = 0.0
    # conditional models: share of labels replaced by "no class" (Ho & Salimans 2022)
    cond_drop: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    max_steps: int = 0  # 0: no limit
    max_minutes: float = 0.0  # 0: no limit
    # or "bf16" autocast: 1.65-1.85x faster on a bf16-capable CPU (the presets: "auto")
    precision: str = "fp32"
    memory_format: str = "contiguous"  # or "channels_last" for the model's weights and activations
    compile: bool = False  # torch.compile the model for the training step

    def __post_init__(self):  # "auto" is resolved before a TrainConfig is made (resolve_configs)
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS[1:]),
                              ("memory_format", MEMORY_FORMATS[1:])):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")

    def recipe(self):
        """What a checkpoint keeps of this config: all but the settings of one command
        (PER_COMMAND)."""
        return {k: v for k, v in asdict(self).items() if k not in PER_COMMAND}

    def decays_within(self, steps):
        """Whether a run of `steps` gets past its warm-up into the decay its lr_schedule asks
        for."""
        return self.lr_schedule == "constant" or self.warmup_steps < steps

    def total_steps(self, steps_per_epoch):
        """The run's planned length in optimizer steps, where its learning-rate schedule ends."""
        return self.steps or self.epochs * steps_per_epoch


def _fits(value, default):
    """Whether a config value has the type of its field's default (an int where a float goes)."""
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
    if type(default) is float:
        return type(value) in (int, float)
    return type(value) is type(default)


def misfit(config):
    """What in a checkpoint's config (its model, diffusion and train tables) a field of their
    dataclass is missing from, or held with the wrong type in, as a phrase; None when all fits."""
    for section, cls in (("model", UNetConfig), ("diffusion", DiffusionConfig),
                         ("train", TrainConfig)):
        table = config[section]
        for field in (f for f in fields(cls) if f.name not in PER_COMMAND):
            if field.name not in table:
                return f"its config lacks {section}.{field.name}"
            if not _fits(table[field.name], field.default):
                return (f"its config's {section}.{field.name} is {table[field.name]!r}, not of "
                        f"type {type(field.default).__name__}")
    return None


def resolve_configs(args, device, saved=None):
    """Model, diffusion and training configs, and a line saying where they came from.

    Every flag left out (None) takes its value from the checkpoint when resuming, else from the
    preset; a flag given explicitly always wins, except that a resumed run's model, batch size and
    seed are fixed, and that the limits of a command (PER_COMMAND) are never taken from a
    checkpoint.
    """
    given = {k: tuple(v) if isinstance(v, list) else v
             for k, v in vars(args).items() if v is not None}
    if "conditional" in given:
        given["num_classes"] = 10 if given.pop("conditional") else 0
    if saved is not None:
        check("preset" not in given, "--preset does not apply with --resume: the run's settings "
                                     "come from its checkpoint; drop --preset")
        base = {**asdict(TrainConfig()), **saved["model"], **saved["diffusion"], **saved["train"]}
        fixed = ([f.name for cls in (UNetConfig, DiffusionConfig) for f in fields(cls)]
                 + list(FIXED_ON_RESUME))
        clash = [k for k in fixed if k in given and given[k] != base[k]]
        def flag(k):  # as the user gave it, and what the checkpoint has
            if k == "num_classes":
                return ("--" + "no-" * (not given[k]) + "conditional",
                        "un" * (not base[k]) + "conditional")
            return f"--{k.replace('_', '-')} {given[k]}", base[k]
        check(not clash,
              "--resume continues a run with its model, batch size and seed; drop or change "
              + ", ".join("%s (checkpoint: %s)" % flag(k) for k in clash)
              + ", or start a new run elsewhere")
        check("epochs" not in given or not base["steps"] or "steps" in given,
              f"--epochs: this run is {base['steps']} steps long (--steps, or the plan of "
              f"--plan-minutes or --max-minutes); give --steps N to change it")
        given.pop("plan_minutes", None)  # 0 (validate() refuses more): the run's length is its own
        note = f"config from {args.resume}"
    else:
        preset = given.get("preset", "auto")
        preset = preset if preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
        base = {**asdict(UNetConfig()), **DiffusionConfig().to_dict(), **asdict(TrainConfig()),
                **PRESETS[preset]}
        why = ("--preset" if given.get("preset", "auto") != "auto"
               else f"--preset auto found a {device.type} device")
        note = f"preset {preset} ({why}; --preset cpu|gpu or any single flag changes it)"
        # a length given replaces the preset's plan
        if "epochs" in given or "steps" in given:
            base.update(steps=0, plan_minutes=0.0)
    merged = {**base, **given}
    # the network's extra output channels
    merged["learned_variance"] = merged["variance"] == "learned"
    # "auto" stored as chosen
    merged.update(fastest_settings(device, merged["precision"], merged["memory_format"]))
    pick = lambda cls: cls(**{f.name: merged[f.name] for f in fields(cls)})
    try:
        return pick(UNetConfig), pick(DiffusionConfig), pick(TrainConfig), note
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def preset_configs(preset, device):
    """The model, diffusion and training configs a preset runs with on `device`, "auto" resolved
    (bench.py's)."""
    return resolve_configs(argparse.Namespace(preset=preset), device)[:3]


def validate(args, model_cfg, cfg):
    """Refuse settings that cannot train, or flags that would be ignored, before anything is
    written."""
    for name in ("epochs", "batch_size", "lr", "checkpoint_every", "log_every"):
        check(getattr(cfg, name) > 0,
              f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    check(0 <= cfg.plan_minutes <= 100_000,  # nan fails here too
          f"--plan-minutes must be from 0 to 100000 minutes, got {cfg.plan_minutes}")
    for name in ("steps", "warmup_steps", "max_steps", "max_minutes", "grad_clip", "ema_power"):
        check(getattr(cfg, name) >= 0,
              f"--{name.replace('_', '-')} cannot be negative, got {getattr(cfg, name)}")
    check(not (args.steps and args.epochs),
          "--steps and --epochs both set the run's length: give one of them")
    check(not (args.plan_minutes and (args.steps or args.epochs)),
          "--plan-minutes sets the run's length from the measured step rate, as --steps and "
          "--epochs do: give one of them")
    check(not (args.plan_minutes and args.resume),
          "--plan-minutes plans a new run; a resumed run keeps its length: give --steps N to "
          "change it")
    check(0 <= cfg.cond_drop <= 1, f"--cond-drop must be in [0, 1], got {cfg.cond_drop}")
    check(model_cfg.num_classes or args.cond_drop is None,
          "--cond-drop applies to class-conditional models only: "
          "add --conditional or drop --cond-drop")
    check(0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    check(0 <= cfg.guide_fraction < 1,
          f"--guide-fraction must be in [0, 1) (0: no guide), got {cfg.guide_fraction}")
    check(args.sample_n >= 0, f"--sample-n must be 0 (no samples) or more, got {args.sample_n}")
