"""config.py: presets fill what flags leave out; a resumed run keeps its model, batch size and seed, and
takes no limit of the command before."""
import pytest
import torch

import train
from diffusion import DiffusionConfig
from cli import UserError
from config import PER_COMMAND, PRESETS, TrainConfig, resolve_configs
from unet import UNetConfig




def parse(*argv):
    return train.build_parser().parse_args(list(argv))


def test_preset_fills_what_flags_leave_out():
    model, diff, cfg, note = resolve_configs(parse("--preset", "gpu", "--width", "32", "--lr", "1e-3"),
                                                   torch.device("cpu"))
    assert model.width == 32 and cfg.lr == 1e-3
    assert model.num_res_blocks == PRESETS["gpu"]["num_res_blocks"]
    assert cfg.epochs == PRESETS["gpu"]["epochs"] and "preset gpu" in note
    _, _, _, note = resolve_configs(parse(), torch.device("cpu"))
    assert "preset cpu" in note and "auto" in note


def test_resume_keeps_the_saved_model_and_refuses_a_different_one():
    saved = {"model": UNetConfig(width=16).to_dict(), "diffusion": DiffusionConfig(200).to_dict(),
             "train": vars(TrainConfig(epochs=5))}
    model, diff, cfg, _ = resolve_configs(parse("--resume", "x", "--epochs", "9"), torch.device("cpu"), saved)
    assert model.width == 16 and diff.timesteps == 200 and cfg.epochs == 9
    with pytest.raises(UserError, match="--width 32 \\(checkpoint: 16\\)"):
        resolve_configs(parse("--resume", "x", "--width", "32"), torch.device("cpu"), saved)


def test_a_resumed_run_takes_no_limit_or_switch_of_the_command_before(tiny_config):
    recipe = TrainConfig(max_steps=3, max_minutes=5.0, compile=True, epochs=5).recipe()
    assert not set(PER_COMMAND) & set(recipe)
    saved = {"model": tiny_config.to_dict(), "diffusion": DiffusionConfig(20).to_dict(), "train": recipe}
    _, _, cfg, _ = resolve_configs(parse("--resume", "x"), torch.device("cpu"), saved)
    assert (cfg.max_steps, cfg.max_minutes, cfg.compile, cfg.epochs) == (0, 0.0, False, 5)
    _, _, cfg, _ = resolve_configs(parse("--resume", "x", "--compile"), torch.device("cpu"), saved)
    assert cfg.compile
    assert parse("--no-compile").compile is False  # a switch that can be turned off, too


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "32"], "--batch-size 32 (checkpoint: 64)"),
    (["--seed", "1"], "--seed 1 (checkpoint: 0)"),
    (["--preset", "cpu"], "--preset does not apply with --resume"),
])
def test_resume_refuses_to_change_what_the_data_order_depends_on(flags, message):
    saved = {"model": UNetConfig(width=16).to_dict(), "diffusion": DiffusionConfig(200).to_dict(),
             "train": TrainConfig(batch_size=64).recipe()}
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        resolve_configs(parse("--resume", "x", *flags), torch.device("cpu"), saved)
