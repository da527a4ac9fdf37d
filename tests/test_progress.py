"""Samples while training (train.py --progress): a grid of the same noise at each checkpoint and a
picture of them at the end, drawn without touching what the run trains."""
import pytest
import torch
from matplotlib.pyplot import imread

from checkpoint import load_checkpoint
from diffusion import Diffusion, DiffusionConfig
from figures import PROGRESS_N, progress_path, save_progress, save_progress_figure
from unet import UNet


def test_a_progress_grid_draws_the_same_noise_every_time_and_leaves_the_model_as_it_was(tmp_path, tiny_config):
    model, diffusion = UNet(tiny_config).train(), Diffusion(DiffusionConfig(20))
    state = torch.get_rng_state()
    save_progress(model, diffusion, tmp_path, 1, seed=3)
    save_progress(model, diffusion, tmp_path, 2, seed=3)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    one, two = (torch.from_numpy(imread(progress_path(tmp_path, s))) for s in (1, 2))
    assert torch.equal(one, two)
    save_progress(model, diffusion, tmp_path, 3, seed=4)
    assert not torch.equal(torch.from_numpy(imread(progress_path(tmp_path, 3))), one)
    # PROGRESS_N images in one row: nearest-neighbour x3, 2 pixels of padding each side, scaled too
    assert one.shape[:2] == (3 * 32, 3 * (PROGRESS_N * 30 + 2))


def test_the_progress_picture_has_a_row_per_grid_drawn_and_none_without_grids(tmp_path, tiny_config):
    assert save_progress_figure(tmp_path, [5, 10]) is None and not (tmp_path / "progress.png").exists()
    model, diffusion = UNet(tiny_config), Diffusion(DiffusionConfig(20))
    save_progress(model, diffusion, tmp_path, 5)
    assert save_progress_figure(tmp_path, [5, 10]) == tmp_path / "progress.png"
    assert torch.from_numpy(imread(tmp_path / "progress.png")).shape[-1] in (3, 4)


@pytest.mark.slow
def test_progress_grids_change_nothing_trained_and_a_resumed_run_still_matches(cli, tmp_path):
    flags = ["--epochs", "1000", "--checkpoint-every", "2", "--sample-n", "0"]
    on = cli.run("train.py", "--max-steps", "6", *flags)
    assert on.returncode == 0, on.stderr
    assert [p.name for p in sorted((cli.out / "progress").iterdir())] == [
        "step-000002.png", "step-000004.png", "step-000006.png"]
    assert (cli.out / "progress.png").exists() and "samples through training" in on.stdout
    off = cli.run("train.py", "--max-steps", "6", *flags, "--no-progress",
                  "--checkpoint-dir", tmp_path / "off", "--output-dir", tmp_path / "off-out")
    assert off.returncode == 0, off.stderr
    assert not (tmp_path / "off-out" / "progress").exists()
    halves = [cli.run("train.py", "--max-steps", "3", *flags, "--checkpoint-dir", tmp_path / "halves",
                      "--output-dir", tmp_path / "halves-out"),
              cli.run("train.py", "--max-steps", "6", *flags, "--resume", tmp_path / "halves",
                      "--checkpoint-dir", tmp_path / "halves", "--output-dir", tmp_path / "halves-out")]
    assert all(r.returncode == 0 for r in halves), [r.stderr for r in halves]
    a = load_checkpoint(cli.ckpt)
    for other in (tmp_path / "off", tmp_path / "halves"):
        b = load_checkpoint(other)
        assert a["step"] == b["step"] == 6 and a["history"] == b["history"]
        for key in ("model", "ema"):
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (other, key, name)
