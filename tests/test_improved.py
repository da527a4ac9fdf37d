"""Improved DDPM (Nichol & Dhariwal 2021) end to end: learned variances, L_hybrid and L_vlb, the importance
sampler of t, bits per dimension, and the ancestral sampler with a learned variance. Tiny shapes."""
import json
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import samplers
import evaluate
import train
from checkpoint import load_checkpoint
from config import TrainConfig
from diffusion import HYBRID_LAMBDA, Diffusion, DiffusionConfig, TimestepSampler
from samplers import sample_ddpm
from unet import UNet

LEVELS = torch.arange(256) / 127.5 - 1  # the values a pixel of the data can take
LEARNED = dict(variance="learned", loss="hybrid")


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LEVELS[torch.randint(0, 256, (n, 1, 28, 28), generator=g)]


def random_unet(config, seed=0):
    """A tiny U-Net whose zero-initialised layers are randomised, so that it predicts something."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("config, problem", [
    (dict(variance="learned"), "trains only through L_vlb"),
    (dict(loss="hybrid"), "use variance learned"),
    (dict(loss="hybrid", variance="fixed_large"), "use variance learned"),
    (dict(loss="vlb", min_snr_gamma=5.0), "loss vlb has none"),
])
def test_settings_that_would_train_nothing_are_refused(config, problem):
    with pytest.raises(ValueError, match=problem):
        DiffusionConfig(**config)
    DiffusionConfig(loss="vlb")  # the true bound trains a fixed variance's mean, as in Ho et al.'s L_vlb runs


def test_fixed_large_is_beta_with_beta_tilde_1_at_t_0():
    d = Diffusion(DiffusionConfig(50, variance="fixed_large"))
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 1, 30])
    _, log_variance, _ = d.p_mean_variance(x, None, x, t)
    expected = torch.stack([d.posterior_log_variance[1], d.log_betas[1], d.log_betas[30]])
    assert torch.equal(log_variance.flatten(), expected)


def test_a_model_of_the_true_posterior_has_no_bound_loss_past_t_0():
    """eps = the true noise gives the true x_0, hence the posterior mean; v = 0 gives beta~_t: L_t = 0."""
    d = Diffusion(DiffusionConfig(20, variance="learned", loss="vlb"))
    x0 = images(5)
    t = torch.tensor([0, 1, 5, 10, 19])
    noise = torch.randn(x0.shape)
    model = lambda xt, tt: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # raw -1: v = 0
    losses = d.loss(model, x0, t, noise)
    assert_close(losses[1:], torch.zeros(4), rtol=0, atol=1e-4)
    assert losses[0] > 0  # the decoder's -log p(x_0 | x_1): a discrete image costs bits
    model = lambda xt, tt: torch.cat([noise, torch.ones_like(noise)], dim=1)  # v = 1: beta_t, not the posterior's
    assert (d.loss(model, x0, t, noise)[1:4] > 1e-3).all()  # at large t, beta_t and beta~_t nearly agree


def test_the_bound_part_of_the_hybrid_loss_trains_only_the_variance():
    d = Diffusion(DiffusionConfig(20, **LEARNED))
    x0, t, noise = images(4), torch.tensor([0, 3, 10, 19]), torch.randn(4, 1, 28, 28)
    out = torch.randn(4, 2, 28, 28, requires_grad=True)
    d.loss(lambda xt, tt: out, x0, t, noise).sum().backward()
    pred = out.detach()[:, :1]
    assert_close(out.grad[:, :1], 2 * (pred - noise) / pred[0].numel())  # the MSE's gradient, nothing else
    assert out.grad[:, 1:].abs().min() > 0  # while every variance output learns from L_vlb
    vlb = d.loss(lambda xt, tt: out.detach(), x0, t, noise) - (pred - noise).pow(2).flatten(1).mean(1)
    assert_close(vlb / (HYBRID_LAMBDA * 20), d.vlb_term(x0, d.q_sample(x0, t, noise), t,
                                                        *d.p_mean_variance(pred, (out.detach()[:, 1:] + 1) / 2,
                                                                           d.q_sample(x0, t, noise), t)[:2]))


def test_the_timestep_history_keeps_the_last_10_per_t_and_samples_uniformly_until_full():
    s = TimestepSampler(4, keep=3)
    for i in range(3):
        s.update(torch.tensor([0, 1, 2]), torch.tensor([i, 10 + i, 20 + i], dtype=torch.float64))
    assert_close(s.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))  # t = 3 has no losses yet
    s.update(torch.tensor([3, 3, 3, 0]), torch.tensor([1.0, 1.0, 1.0, 5.0]))
    assert s.losses[0].tolist() == [1, 2, 5] and s.counts.tolist() == [3, 3, 3, 3]  # oldest dropped
    rms = s.losses.pow(2).mean(1).sqrt()
    assert_close(s.probabilities(), 0.999 * rms / rms.sum() + 0.001 / 4)


def test_importance_sampled_vlb_is_unbiased():
    """E over t ~ p of w_t T L_t, w_t = 1 / (T p_t), is sum_t L_t: what uniform t estimates."""
    T = 50
    s = TimestepSampler(T)
    g = torch.Generator().manual_seed(0)
    L = torch.rand(T, generator=g, dtype=torch.float64) ** 4 + torch.linspace(1, 0, T, dtype=torch.float64) ** 8
    for _ in range(10):
        s.update(torch.arange(T), L * (1 + 0.1 * torch.randn(T, generator=g, dtype=torch.float64)))
    assert not torch.allclose(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    t, w = s.sample(200_000, g)
    values = w.double() * T * L[t]
    uniform = T * L[torch.randint(0, T, (200_000,), generator=g)]
    assert abs(values.mean() - L.sum()) < 4 * values.std() / len(values) ** 0.5
    assert abs(uniform.mean() - L.sum()) < 4 * uniform.std() / len(uniform) ** 0.5
    assert values.std() < uniform.std()  # what importance sampling is for


@pytest.mark.parametrize("config", [dict(), dict(variance="learned", loss="hybrid", prediction="v")])
def test_the_estimate_of_the_bound_agrees_with_the_exact_bound(tiny_config, config):
    d = Diffusion(DiffusionConfig(20, **config))
    model = random_unet(replace(tiny_config, learned_variance=d.config.variance == "learned"))
    x0 = images(4)
    g = torch.Generator().manual_seed(1)
    # Both are unbiased for each image's bound: all t with one x_t each, or one t; their means must agree.
    exact = torch.stack([d.bits_per_dim(model, x0, g) for _ in range(10)]).double()  # [10, 4]
    draws = torch.stack([d.bits_per_dim_estimate(model, x0, g) for _ in range(200)]).double()  # [200, 4]
    se = (exact.var(0) / len(exact) + draws.var(0) / len(draws)).sqrt()
    assert ((draws.mean(0) - exact.mean(0)).abs() < 3 * se).all(), (draws.mean(0), exact.mean(0), se)
    assert (exact.std(0) < draws.std(0)).all()  # all T terms vary less than one scaled by T - 1


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned"])
def test_respacing_with_all_t_steps_is_the_unrespaced_sampler(tiny_config, variance):
    """Algorithm 2 of Ho et al. 2020 written out with p(x_{t-1} | x_t) on the original schedule."""
    d = Diffusion(DiffusionConfig(20, variance=variance, loss="vlb"))
    model = random_unet(replace(tiny_config, learned_variance=variance == "learned"))
    noise = torch.randn(3, 1, 28, 28)
    x, g = noise, torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in reversed(range(20)):
            tb = torch.full((3,), t)
            mean, log_variance, _ = d.p_mean_variance(*d.split(model(x, tb)), x, tb, clip=True)
            x = mean + (t > 0) * torch.exp(0.5 * log_variance) * torch.randn(x.shape, generator=g)
    got = sample_ddpm(model, d, noise, steps=20, generator=torch.Generator().manual_seed(5))
    assert_close(got, x, rtol=1e-4, atol=1e-4)
    fewer = sample_ddpm(model, d, noise, steps=5, generator=torch.Generator().manual_seed(5))
    assert fewer.isfinite().all() and not torch.allclose(fewer, got)
    # A jump from t to s takes beta = 1 - abar_t / abar_s and beta~ = beta (1 - abar_s) / (1 - abar_t), not beta_t.
    abar, v = d.alphas_cumprod.double(), torch.full((1,), 0.25, dtype=torch.float64)
    beta = 1 - abar[15] / abar[10]
    tilde = beta * (1 - abar[10]) / (1 - abar[15])
    expected = {"fixed_small": tilde.log(), "fixed_large": beta.log(),
                "learned": 0.25 * beta.log() + 0.75 * tilde.log()}
    assert_close(d.step_log_variance(v, abar[15], abar[10]).expand(1), expected[variance].expand(1))


def test_resume_with_loss_vlb_is_bitwise_the_unbroken_run(tmp_path, tiny_config, tiny_run):
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    cfg = dict(epochs=10, batch_size=16, lr=1e-3, warmup_steps=2, log_every=5, checkpoint_every=1000)
    learned, vlb = replace(tiny_config, learned_variance=True), DiffusionConfig(20, variance="learned", loss="vlb")
    run = lambda name, **kw: tiny_run(tmp_path / name, learned, TrainConfig(**cfg, **kw), images,
                                      diffusion_cfg=vlb)
    straight, straight_ema, s1 = run("a")
    run("b", max_steps=25)
    stopped = load_checkpoint(tmp_path / "b")["timestep_history"]
    assert (stopped["counts"] == 10).all()  # by step 25 importance sampling has begun: resume must carry it
    resumed, resumed_ema, s2 = tiny_run(tmp_path / "b", learned, TrainConfig(**cfg), images, diffusion_cfg=vlb,
                                        resume=tmp_path / "b")
    assert s1["step"] == s2["step"] == 40 and s1["history"] == s2["history"]
    for model_a, model_b in ((straight, resumed), (straight_ema, resumed_ema)):
        for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            assert torch.equal(a, b), name
    a, b = load_checkpoint(tmp_path / "a")["timestep_history"], load_checkpoint(tmp_path / "b")["timestep_history"]
    assert torch.equal(a["losses"], b["losses"]) and torch.equal(a["counts"], b["counts"])
    assert not torch.equal(a["losses"], stopped["losses"])


def test_training_weighs_each_example_by_its_importance_weight(tmp_path, tiny_config, tiny_run, monkeypatch):
    """The step's loss is mean(w_i T L_{t_i}), not the unweighted mean, once t is importance-sampled."""
    weights = torch.tensor([0.5, 3.0, 1.0, 0.25])
    monkeypatch.setattr(TimestepSampler, "sample", lambda self, n, g, device: (torch.tensor([0, 5, 10, 19]), weights))
    seen = []
    hook = lambda loss: lambda *a: (lambda out: seen.append(out.detach()) or out)(loss(*a))
    learned = replace(tiny_config, learned_variance=True)
    _, _, state = tiny_run(tmp_path, learned, TrainConfig(epochs=1, batch_size=4, max_steps=1), loss_hook=hook,
                           diffusion_cfg=DiffusionConfig(20, variance="learned", loss="vlb"))
    assert_close(state["history"][0][2], (seen[0] * weights).mean().item())
    assert not torch.allclose(seen[0].mean(), (seen[0] * weights).mean())


def test_a_nan_loss_is_left_out_of_the_timestep_history():
    s = TimestepSampler(3, keep=2)
    s.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, float("nan"), 2.0]))
    assert s.counts.tolist() == [1, 1, 0] and s.losses[1, 0] == 2.0


def test_guidance_steers_the_prediction_and_keeps_the_conditional_variance(tiny_config):
    model = random_unet(replace(tiny_config, num_classes=10, learned_variance=True))
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 7]), torch.tensor([1, 4])
    with torch.no_grad():
        out = samplers.guided(model, labels, 2.0)(x, t)
        cond, uncond = model(x, t, labels), model(x, t)
    assert_close(out[:, :1], 3 * cond[:, :1] - 2 * uncond[:, :1])
    # guided() runs both in one doubled batch: equal to the separate calls up to the rounding of another
    # batch size (bitwise on the Intel Xeon, not on the AMD EPYC), and far from the unconditional variance.
    assert_close(out[:, 1:], cond[:, 1:])
    assert (cond[:, 1:] - uncond[:, 1:]).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["hybrid", "vlb"])
def test_learned_variance_trains_samples_and_scores_from_the_command_line(cli, loss):
    trained = cli.run("train.py", "--variance", "learned", "--loss", loss, "--max-steps", "12", "--sample-n", "4",
                      "--checkpoint-every", "5")
    assert trained.returncode == 0, trained.stderr
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["config"]["diffusion"]["variance"] == "learned" and ckpt["config"]["model"]["learned_variance"]
    assert (ckpt["timestep_history"] is not None) == (loss == "vlb")
    drawn = cli.run("sample.py", "--sampler", "ddpm", "--steps", "5", "--n", "3")  # nothing re-passed
    assert drawn.returncode == 0, drawn.stderr
    scored = cli.run("evaluate.py", "--bpd", "--bpd-exact", "3", "--data-dir", cli.data)
    assert scored.returncode == 0, scored.stderr
    result = json.loads((cli.out / "bpd.json").read_text())
    assert result["estimate"]["images"] == 64 and result["exact"]["images"] == 3
    assert 0 < result["exact"]["bpd"] and 0 < result["estimate"]["standard_error"] < result["estimate"]["bpd"]


@pytest.mark.parametrize("flags, message", [
    (["--variance", "learned"], "trains only through L_vlb"),
    (["--loss", "hybrid"], "use variance learned"),
])
def test_train_refuses_a_variance_and_loss_that_do_not_go_together(fails, cli, flags, message):
    err = fails(train, ["--data-dir", cli.data, "--checkpoint-dir", cli.ckpt, *flags])
    assert message in err and not cli.ckpt.exists()


@pytest.mark.parametrize("flag", [["--steps", "10"], ["--n", "500"], ["--classifier-dir", "x"]])
def test_bpd_refuses_sampling_flags(fails, good_checkpoint, tmp_path, flag):
    err = fails(evaluate, ["--checkpoint", good_checkpoint, "--bpd", *flag, "--output-dir", tmp_path / "o"])
    assert f"drop {flag[0]}" in err and not (tmp_path / "o").exists()
