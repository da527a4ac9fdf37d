"""Class-conditional generation with classifier-free guidance."""
import json
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import data
import training
import figures
import samplers
import evaluate
import sample
from checkpoint import load_checkpoint
from cli import UserError
from data import CLASSES
from diffusion import Diffusion, DiffusionConfig
from unet import UNet


@pytest.fixture
def conditional_model(tiny_config):
    model = UNet(replace(tiny_config, num_classes=10)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_label_dropout_rate(p):
    labels = torch.randint(0, 10, (200_000,))
    dropped = training.drop_labels(labels, p, null=10)
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - p) <= 5 * (p * (1 - p) / len(labels)) ** 0.5 + 1e-9
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])


def test_the_class_changes_the_prediction_and_none_is_the_null_token(conditional_model):
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    a, b = conditional_model(x, t, torch.tensor([0, 0])), conditional_model(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(a, b)
    assert torch.equal(conditional_model(x, t), conditional_model(x, t, torch.tensor([10, 10])))


def test_guidance_zero_is_the_conditional_model_and_w_follows_eq_6(conditional_model):
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10, 400, 900]), torch.tensor([1, 5, 9])
    assert_close(samplers.guided(conditional_model, y, 0.0)(x, t), conditional_model(x, t, y))
    cond, uncond = conditional_model(x, t, y), conditional_model(x, t, torch.full_like(y, 10))
    assert_close(samplers.guided(conditional_model, y, 3.0)(x, t), 4.0 * cond - 3.0 * uncond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, index", [("Ankle boot", 9), ("ankle BOOT", 9), ("t-shirt/top", 0), ("7", 7), ("0", 0)])
def test_class_names_and_indices(text, index):
    assert data.parse_class(text) == index


def test_unknown_class_lists_the_valid_ones(good_checkpoint, tmp_path, fails):
    with pytest.raises(UserError, match="Sneaker, Bag, Ankle boot"):
        data.parse_class("sneakers")
    with pytest.raises(UserError):
        data.parse_class("10")
    err = fails(sample, ["--checkpoint", good_checkpoint, "--class", "boots", "--output-dir", tmp_path])
    assert "unknown class 'boots'" in err and "Ankle boot" in err


def test_class_on_an_unconditional_model_is_refused(good_checkpoint, tmp_path, fails):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--class", "Bag", "--output-dir", tmp_path])
    assert "needs a class-conditional model" in err


def test_per_class_grid_has_a_row_per_class_in_order(conditional_model, tmp_path, monkeypatch):
    seen = {}

    def fake_save_labelled(groups, path, title, rows=False):
        seen.update(groups=groups, rows=rows, path=path)

    monkeypatch.setattr(figures, "save_labelled", fake_save_labelled)
    n, images = figures.draw_pictures(conditional_model, Diffusion(DiffusionConfig(10)), 25, tmp_path, guidance=1.0,
                                      sampler=samplers.SamplerConfig("ddpm", 2))
    assert n == 30 and images.shape == (30, 1, 28, 28)  # ceil(25 / 10) = 3 per class
    assert seen["rows"] and seen["path"].name == "samples_by_class.png"
    assert [name for name, _ in seen["groups"]] == list(CLASSES)
    assert all(len(x) == 3 for _, x in seen["groups"])
    assert torch.equal(torch.cat([x for _, x in seen["groups"]]), images)
    assert (tmp_path / "samples.png").is_file()


def test_unconditional_drawing_asks_for_no_class(conditional_model, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(figures, "generate_batches", lambda *a, **k: asked.append(k) or [torch.zeros(a[2], 1, 28, 28)])
    n, images = figures.draw_pictures(conditional_model, Diffusion(DiffusionConfig(10)), 7, tmp_path, by_class=False)
    assert n == 7 and images.shape[0] == 7 and asked[0]["labels"] is None  # the 'no class' token, as model(x, t) takes it
    assert not (tmp_path / "samples_by_class.png").exists()


@pytest.mark.parametrize("flags, message", [
    (["--unconditional", "--class", "bag"], "drop one of them"),
    (["--unconditional", "--guidance", "1"], "drop one of them"),
])
def test_unconditional_with_a_class_or_guidance_is_refused(conditional_model, tmp_path, fails, flags, message):
    from checkpoint import make_checkpoint, save_checkpoint
    from config import TrainConfig
    part = training.new_part(conditional_model.config, TrainConfig(), torch.device("cpu"))
    save_checkpoint(make_checkpoint(part, Diffusion(DiffusionConfig(10)), TrainConfig().recipe(),
                                    training.new_state(), 1), tmp_path)
    err = fails(sample, ["--checkpoint", tmp_path, "--output-dir", tmp_path / "out", *flags])
    assert message in err and not (tmp_path / "out").exists()


def test_unconditional_on_an_unconditional_model_is_refused(good_checkpoint, tmp_path, fails):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--unconditional", "--output-dir", tmp_path])
    assert "unconditional already" in err


def test_generate_gives_each_image_its_class(conditional_model, monkeypatch):
    asked = []
    real_guided = samplers.guided
    monkeypatch.setattr(samplers, "guided", lambda m, y, w: asked.append(y.clone()) or real_guided(m, y, w))
    labels = torch.tensor([3, 3, 8, 1, 0])
    samplers.generate(conditional_model, Diffusion(DiffusionConfig(10)), 5, sampler=samplers.SamplerConfig("ddpm", 2),
                      batch_size=2, labels=labels)
    assert torch.equal(torch.cat(asked), labels)


@pytest.mark.slow
def test_conditional_train_sample_evaluate(cli):
    r = cli.run("train.py", "--conditional", "--max-steps", "4", "--sample-n", "10")
    assert r.returncode == 0, r.stderr
    assert (cli.out / "samples_by_class.png").is_file()
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["config"]["model"]["num_classes"] == 10
    r = cli.run("sample.py", "--class", "ankle boot", "--guidance", "1.5", "--n", "3", "--steps", "4")
    assert r.returncode == 0, r.stderr
    r = cli.run("sample.py", "--unconditional", "--n", "3", "--steps", "4", "--output-dir", cli.out / "none")
    assert r.returncode == 0, r.stderr
    assert (cli.out / "none" / "samples.png").is_file() and not (cli.out / "none" / "samples_by_class.png").exists()
    evaluate.main([str(a) for a in ["--checkpoint", cli.ckpt, "--data-dir", cli.data, "--classifier-dir", cli.ckpt,
                                    "--output-dir", cli.out, "--n", "20", "--sampler", "ddim", "--steps", "3",
                                    "--guidance-sweep", "0", "2"]])
    rows = json.loads((cli.out / "eval.json").read_text())["rows"]
    assert [r["guidance"] for r in rows[1:]] == [0, 2]
    assert all(0 <= r["accuracy"] <= 1 and len(r["fid_per_class"]) == 10 for r in rows[1:])
    assert (cli.out / "guidance.png").stat().st_size > 0
