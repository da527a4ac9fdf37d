from pathlib import Path

import numpy as np
import pytest
import torch

import training
import data
import train
from diffusion import Diffusion, DiffusionConfig
from checkpoint import load_checkpoint
from cli import UserError
from config import PER_COMMAND, PRESETS, TrainConfig, resolve_configs
from unet import UNet, UNetConfig


# ---------------------------------------------------------------------------- data

def test_loads_idx_files_it_is_pointed_at(fake_mnist, tmp_path, monkeypatch):
    folder, arrays = fake_mnist
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    images, labels = data.load_fashion_mnist(tmp_path / "data")
    assert images.dtype == torch.uint8 and images.shape == (256, 28, 28)
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(labels.numpy(), arrays["train-labels-idx1-ubyte"])
    # Decompressed into the data dir once: found there next time without the variable.
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert (tmp_path / "data/FashionMNIST/raw/train-images-idx3-ubyte").is_file()
    test_images, _ = data.load_fashion_mnist(tmp_path / "data", train=False)
    assert np.array_equal(test_images.numpy(), arrays["t10k-images-idx3-ubyte"])


def test_debian_package_location_is_used(fake_mnist, tmp_path, monkeypatch):
    folder, arrays = fake_mnist
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", folder)
    images, _ = data.load_fashion_mnist(tmp_path / "data")
    assert np.array_equal(images.numpy(), arrays["train-images-idx3-ubyte"])


def test_missing_data_names_three_ways_to_get_it(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(UserError) as e:
        data.prepare_fashion_mnist(tmp_path / "data")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "FASHION_MNIST_DIR" in msg and "internet" in msg


@pytest.mark.skipif(data._find_idx_files(data.DEBIAN_DIR) is None and not Path("data/FashionMNIST/raw").is_dir(),
                    reason="real Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path):
    data_dir = "data" if Path("data/FashionMNIST/raw").is_dir() else tmp_path
    images, labels = data.load_fashion_mnist(data_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    x = data.to_model_range(images[:1000])
    assert x.min() == -1 and x.max() == 1 and x.shape == (1000, 1, 28, 28)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = data.epoch_batches(100, 8, seed=0, epoch=3, device="cpu")
    assert a.shape == (12, 8)
    assert len(a.unique()) == 96
    assert torch.equal(a, data.epoch_batches(100, 8, seed=0, epoch=3, device="cpu"))
    assert not torch.equal(a, data.epoch_batches(100, 8, seed=0, epoch=4, device="cpu"))


# ---------------------------------------------------------------------------- learning

def test_tiny_model_overfits_a_fixed_batch(tiny_config):
    d = Diffusion(DiffusionConfig(100))
    model = UNet(tiny_config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    t, noise = torch.randint(0, 100, (8,)), torch.randn(8, 1, 28, 28)
    losses = []
    for _ in range(150):
        loss = d.loss(model, x0, t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20


@pytest.mark.parametrize("power", [8.0, 2.0])
def test_ema_follows_its_formula(tiny_config, power):
    model = UNet(tiny_config)
    ema = training.EMA(model, decay=0.9, power=power)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        if n == 1:  # the first update copies the weights
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            d = min(0.9, n / (n + power + 1))  # n - 1 updates averaged before this one
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_gradient_clipping_limits_the_norm_adam_sees(tmp_path, tiny_config, tiny_run, monkeypatch, grad_clip):
    seen = []  # global gradient norm at each optimizer step
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    tiny_run(tmp_path, tiny_config, TrainConfig(epochs=1, batch_size=8, grad_clip=grad_clip))
    assert len(seen) == 4
    if grad_clip:
        assert max(seen) <= grad_clip * 1.0001
    else:  # unclipped gradients of a fresh model are far larger than 1e-3
        assert min(seen) > 1e-2


# ---------------------------------------------------------------------------- checkpoints and resume

def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_config, tiny_run):
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    cfg = dict(epochs=3, batch_size=8, lr=1e-3, warmup_steps=2, log_every=2, checkpoint_every=100)
    straight, straight_ema, s1 = tiny_run(tmp_path / "a", tiny_config, TrainConfig(**cfg), images)
    # Stop mid-epoch (step 7 of 15, epoch 1 has steps 5-9), then resume in a fresh model.
    tiny_run(tmp_path / "b", tiny_config, TrainConfig(**cfg, max_steps=7), images)
    assert load_checkpoint(tmp_path / "b")["step"] == 7
    resumed, resumed_ema, s2 = tiny_run(tmp_path / "b", tiny_config, TrainConfig(**cfg), images, resume=tmp_path / "b")
    assert s1["step"] == s2["step"] == 15
    for model_a, model_b in ((straight, resumed), (straight_ema, resumed_ema)):
        for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            assert torch.equal(a, b), name
    assert s1["history"] == s2["history"]


# ---------------------------------------------------------------------------- configuration

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


def test_the_images_per_second_count_every_step_and_no_save(tmp_path, tiny_config, tiny_run, monkeypatch, capsys):
    """A clock that ticks one second per training step and stands still while saving: every log line must
    say batch / 1 s, also when checkpoints (every 3 steps) fall between log lines (every 4)."""
    clock = [0.0]
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (clock.__setitem__(0, clock[0] + 1),
                                                                          step(self, *a, **k))[1])
    monkeypatch.setattr(training.time, "time", lambda: clock[0])
    cfg = TrainConfig(epochs=3, batch_size=4, log_every=4, checkpoint_every=3)
    tiny_run(tmp_path, tiny_config, cfg)  # 32 images: 24 steps
    rates = [line.split(", ")[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert rates == ["4 img/s"] * 6


def test_the_loss_curve_is_named_after_the_loss_trained(cli, monkeypatch):
    names = []
    monkeypatch.setattr(train, "save_loss_history", lambda history, out, name: names.append(name))
    for flags in ([], ["--min-snr-gamma", "5"], ["--prediction", "v"]):
        train.main([str(a) for a in cli.command("train.py", "--max-steps", "1", "--sample-n", "0", "--overwrite",
                                                *flags)[2:]])
    assert names == ["L_simple, eps MSE", "eps MSE, min-SNR-5 weighted", "v MSE"]
