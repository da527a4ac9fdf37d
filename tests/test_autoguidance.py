"""Autoguidance (Karras et al. 2024): the early EMA a run keeps as its guide, and sampling guided by it."""
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import sample
import samplers
from checkpoint import build_guide, load_checkpoint
from cli import UserError
from config import TrainConfig
from diffusion import DiffusionConfig
from training import EMA


class Affine(torch.nn.Module):
    """A stand-in network, a * x + b * t (+ the label), with the config a sampler reads."""

    def __init__(self, a, b, config):
        super().__init__()
        self.a, self.b, self.config = torch.nn.Parameter(torch.tensor(a)), b, config

    def forward(self, x, t, labels=None):
        y = 0 if labels is None else labels.view(-1, 1, 1, 1)
        out = self.a * x + self.b * t.view(-1, 1, 1, 1) + y
        return torch.cat([out, out], dim=1) if self.config.learned_variance else out  # [eps, variance]


def test_autoguidance_extrapolates_from_the_guide_to_the_model(tiny_config):
    """Eq. 1 of Karras et al. 2024: (1 + w) D - w D_guide, labels passed to both networks."""
    model, guide = Affine(2.0, 1.0, tiny_config), Affine(1.5, 0.0, tiny_config)
    x, t, labels = torch.randn(3, 1, 4, 4), torch.tensor([1, 5, 9]), torch.tensor([0, 3, 7])
    with torch.no_grad():
        out = samplers.Autoguided(model, guide, 0.5)(x, t, labels)
        expected = 1.5 * model(x, t, labels) - 0.5 * guide(x, t, labels)
    assert_close(out, expected)
    assert_close(out, 2.25 * x + 1.5 * t.view(-1, 1, 1, 1) + labels.view(-1, 1, 1, 1))


def test_a_learned_variance_is_the_models_own(tiny_config):
    model = Affine(2.0, 0.0, replace(tiny_config, learned_variance=True))
    guide = Affine(1.0, 0.0, model.config)
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        out = samplers.Autoguided(model, guide, 1.0)(x, torch.tensor([3, 4]))
    assert_close(out[:, :1], 3.0 * x)  # eps guided: 2 * 2x - x
    assert_close(out[:, 1:], 2.0 * x)  # the variance channel: the model's own


def test_the_default_scale_applies_only_where_there_is_a_guide(tiny_config):
    model, guide = Affine(2.0, 0.0, tiny_config), Affine(1.0, 0.0, tiny_config)
    guided, w = samplers.autoguided(model, guide)
    assert w == samplers.AUTOGUIDANCE > 0 and isinstance(guided, samplers.Autoguided)
    assert samplers.autoguided(model, None) == (model, 0.0)
    assert samplers.autoguided(model, guide, 0.0) == (model, 0.0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--autoguidance must be 0"):
            samplers.autoguided(model, guide, bad)
    with pytest.raises(UserError, match="keeps none"):
        samplers.autoguided(model, None, 0.5)


def test_the_ema_keeps_its_value_at_the_update_asked_and_no_later_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9, 4.0, keep_at=2)
    seen = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        seen.append({k: v.clone() for k, v in ema.module.state_dict().items()})
        assert (ema.kept is None) == (len(seen) < 2)
    assert_close(ema.kept, seen[1], rtol=0, atol=0)
    assert not torch.equal(ema.kept["weight"], seen[3]["weight"])


def test_the_guide_is_the_ema_of_the_run_stopped_there_and_survives_a_resume(tmp_path, tiny_config,
                                                                              tiny_run):
    """guide_fraction 0.25 of 8 steps: the EMA after step 2, bit for bit, of the same run (same
    schedule) stopped at step 2; resumed from step 1 (before it) or step 3 (after it, from the
    checkpoint), the run keeps the same guide."""
    cfg = TrainConfig(steps=8, batch_size=8, guide_fraction=0.25, checkpoint_every=1000)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    tiny_run(tmp_path / "whole", tiny_config, cfg, images)
    whole = load_checkpoint(tmp_path / "whole")
    tiny_run(tmp_path / "early", tiny_config, replace(cfg, max_steps=2), images)
    early = load_checkpoint(tmp_path / "early")
    assert early["step"] == 2 and whole["step"] == 8
    assert_close(whole["guide"], early["ema"], rtol=0, atol=0)
    assert not torch.equal(whole["guide"]["out.2.weight"], whole["ema"]["out.2.weight"])
    for stop in (1, 3):
        folder = tmp_path / f"stop{stop}"
        tiny_run(folder, tiny_config, replace(cfg, max_steps=stop), images)
        assert (load_checkpoint(folder)["guide"] is None) == (stop < 2)
        tiny_run(folder, tiny_config, cfg, images, resume=folder / "ckpt.pt")
        resumed = load_checkpoint(folder)
        for key in ("guide", "ema", "model"):
            assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert build_guide(whole).config == tiny_config


def test_train_and_sample_guide_by_default_where_the_run_keeps_a_guide(cli):
    r = cli.run("train.py", "--steps", "4", "--guide-fraction", "0.5", "--sample-n", "2")
    assert r.returncode == 0 and f"autoguided at {samplers.AUTOGUIDANCE:g}" in r.stdout, r.stderr
    r = cli.run("sample.py", "--n", "2", "--steps", "3")
    assert r.returncode == 0 and f"autoguidance {samplers.AUTOGUIDANCE:g}" in r.stdout, r.stderr
    r = cli.run("sample.py", "--n", "2", "--steps", "3", "--autoguidance", "0")
    assert r.returncode == 0 and "autoguidance" not in r.stdout, r.stderr


def test_autoguidance_without_a_guide_is_one_line(good_checkpoint, tmp_path, fails):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--output-dir", tmp_path, "--autoguidance", "1"])
    assert "keeps none" in err and not (tmp_path / "samples.png").exists()
    err = fails(sample, ["--checkpoint", good_checkpoint, "--output-dir", tmp_path, "--autoguidance", "-1"])
    assert "--autoguidance must be 0" in err


def test_a_guide_that_is_not_a_table_is_damaged(good_checkpoint, tmp_path, fails):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    torch.save({**ckpt, "guide": [1, 2]}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "out"])
    assert "its guide or other networks' weights are not tables" in err


@pytest.mark.parametrize("fraction", ["-0.1", "1", "1e20"])
def test_a_guide_fraction_outside_0_1_is_refused(cli, fraction):
    r = cli.run("train.py", "--steps", "4", "--guide-fraction", fraction)
    assert r.returncode == 2 and "--guide-fraction must be in [0, 1)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (cli.ckpt / "ckpt.pt").exists()



def test_a_run_that_keeps_no_guide_samples_unguided(cli):
    r = cli.run("train.py", "--steps", "4", "--sample-n", "2")
    assert r.returncode == 0 and "autoguided" not in r.stdout, r.stderr
    r = cli.run("sample.py", "--n", "2", "--steps", "3")
    assert r.returncode == 0 and "autoguidance" not in r.stdout, r.stderr


def test_evaluate_scores_the_guided_model_at_the_default_scale(tmp_path, tiny_config, tiny_run):
    import evaluate
    tiny_run(tmp_path, tiny_config, TrainConfig(steps=4, batch_size=8, guide_fraction=0.5))
    ckpt = load_checkpoint(tmp_path)
    model, diffusion, w = evaluate.with_guide(ckpt, "cpu", "ema", None)
    assert isinstance(model, samplers.Autoguided) and w == samplers.AUTOGUIDANCE
    assert diffusion.timesteps == 20 and evaluate.with_guide(ckpt, "cpu", "raw", 0.0)[2] == 0.0


def test_evaluate_guides_with_another_checkpoint_of_the_same_kind(tmp_path, tiny_config, tiny_run):
    """--guide: what the guide table in docs/results.md scored, an earlier checkpoint's EMA."""
    import evaluate
    cfg = TrainConfig(steps=4, batch_size=8)
    tiny_run(tmp_path / "a", tiny_config, cfg)
    tiny_run(tmp_path / "early", tiny_config, replace(cfg, max_steps=2))
    ckpt, early = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "early")
    model, _, w = evaluate.with_guide(ckpt, "cpu", "ema", None, early)
    assert isinstance(model, samplers.Autoguided) and w == samplers.AUTOGUIDANCE
    assert_close(model.guide.state_dict(), early["ema"], rtol=0, atol=0)
    tiny_run(tmp_path / "c", tiny_config, cfg, diffusion_cfg=DiffusionConfig(30))  # another T
    with pytest.raises(UserError, match="--guide must be a checkpoint of the same kind"):
        evaluate.with_guide(ckpt, "cpu", "ema", 1.0, load_checkpoint(tmp_path / "c"))
