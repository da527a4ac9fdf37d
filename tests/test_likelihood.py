"""The terms of the variational bound (Improved DDPM, Nichol & Dhariwal 2021): analytic checks, tiny shapes."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from diffusion import Diffusion, DiffusionConfig, discretized_gaussian_log_likelihood, make_betas, normal_kl

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values a pixel of the data can take


@pytest.mark.parametrize("mean, log_scale", [(0.0, -4.0), (0.3, -1.0), (-0.999, -6.0), (1.4, 0.5), (-3.0, -0.2)])
def test_the_decoder_gives_every_pixel_a_probability_that_sums_to_1(mean, log_scale):
    x = LEVELS.view(256, 1, 1, 1)
    log_p = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(log_scale, dtype=torch.float64))
    assert (log_p <= 0).all()
    assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-9)


def test_a_bin_far_above_the_mean_keeps_its_small_mass_in_float32():
    """Phi(upper) - Phi(lower) of two numbers near 1 would cancel to 0 in float32; the upper tail does not."""
    x, mean, log_scale = LEVELS[200], torch.tensor(0.0, dtype=torch.float64), torch.tensor(-2.2, dtype=torch.float64)
    exact = discretized_gaussian_log_likelihood(x, mean, log_scale).exp()
    single = discretized_gaussian_log_likelihood(x.float(), mean.float(), log_scale.float()).exp()
    assert 1e-9 < exact < 1e-6
    assert_close(single.double(), exact, rtol=1e-3, atol=0)


def test_a_narrow_decoder_puts_its_mass_on_the_nearest_level():
    log_p = discretized_gaussian_log_likelihood(LEVELS, LEVELS[100] + 0.001, torch.tensor(-8.0, dtype=torch.float64))
    assert log_p.argmax() == 100 and log_p[100].exp() > 0.99


def test_normal_kl_is_zero_for_equal_gaussians_and_torch_distributions_otherwise():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    assert_close(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert_close(normal_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_posterior_is_bayes_rule_on_the_forward_process(schedule):
    """q(x_{t-1} | x_t, x_0) from q(x_{t-1} | x_0) q(x_t | x_{t-1}): precisions add, means weigh by precision."""
    d = Diffusion(DiffusionConfig(50, schedule))
    betas = make_betas(schedule, 50)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([1, 7, 30, 49])
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.rand(4, 1, 2, 2, generator=g) * 2 - 1, torch.randn(4, 1, 2, 2, generator=g)
    prev, beta = abar[t - 1].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - prev) + (1 - beta) / beta
    mean = (prev.sqrt() * x0.double() / (1 - prev) + (1 - beta).sqrt() * xt.double() / beta) / precision
    got_mean, got_log_variance = d.q_posterior(x0, xt, t)
    assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert_close(got_log_variance.double(), (1 / precision).log(), rtol=1e-5, atol=1e-6)
    # At t = 0 (the papers' t = 1) the posterior of x_0 given x_0 is x_0 itself.
    assert_close(d.q_posterior(x0, xt, torch.zeros(4, dtype=torch.long))[0], x0)


def test_v_0_and_v_1_give_the_posterior_variance_and_beta_exactly():
    d = Diffusion(DiffusionConfig(100))
    t = torch.tensor([0, 1, 50, 99])
    ones = torch.ones(4, 1, 2, 2)
    tilde = d.posterior_log_variance[t].view(-1, 1, 1, 1).expand_as(ones)
    assert torch.equal(d.interpolated_log_variance(0 * ones, t), tilde)
    assert torch.equal(d.interpolated_log_variance(ones, t), d.log_betas[t].view(-1, 1, 1, 1).expand_as(ones))
    betas = make_betas("linear", 100)
    abar = torch.cumprod(1 - betas, 0)
    assert_close(d.posterior_log_variance[50].double(), (betas[50] * (1 - abar[49]) / (1 - abar[50])).log())
    assert d.posterior_log_variance[0] == d.posterior_log_variance[1]  # beta~_0 = 0: clipped to beta~_1
    middle = d.interpolated_log_variance(0.5 * ones, t)
    assert_close(middle, (tilde + d.log_betas[t].view(-1, 1, 1, 1)) / 2)


def test_the_true_posterior_has_no_loss_and_the_decoder_a_positive_one():
    d = Diffusion(DiffusionConfig(20))
    g = torch.Generator().manual_seed(0)
    x0 = LEVELS[torch.randint(0, 256, (5, 1, 4, 4), generator=g)].float()
    t = torch.tensor([0, 1, 5, 10, 19])
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    mean, log_variance = d.q_posterior(x0, xt, t)
    terms = d.vlb_term(x0, xt, t, mean, log_variance)
    assert_close(terms[1:], torch.zeros(4), rtol=0, atol=1e-6)
    assert terms[0] > 0  # -log p(x_0 | x_1) of a discrete image: positive bits
    worse = d.vlb_term(x0, xt, t, mean + 0.1, log_variance)
    assert (worse[1:] > 1e-3).all()


def test_the_prior_term_matches_its_closed_form_where_the_signal_is_not_yet_gone():
    """The same formula with abar_{T-1} = 0.5, where the variance term is as large as the mean's."""
    d, a = Diffusion(DiffusionConfig(10)), 0.5
    d.sqrt_alphas_cumprod[-1] = d.sqrt_one_minus_alphas_cumprod[-1] = a ** 0.5
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).view(2, 1, 2, 2)
    expected = (a * x0**2 - a - torch.log(torch.tensor(1 - a, dtype=torch.float64))).flatten(1).mean(1) / 2
    assert_close(d.prior_bpd(x0.float()).double(), expected / torch.log(torch.tensor(2.0, dtype=torch.float64)),
                 rtol=1e-5, atol=1e-7)


def test_the_prior_term_is_small_when_the_schedule_ends_in_noise():
    """KL(N(sqrt(a) x_0, 1 - a) || N(0, 1)) = (a x_0^2 - a - log(1 - a)) / 2 per pixel, a = abar_{T-1}."""
    d = Diffusion(DiffusionConfig(1000))
    x0 = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2)])
    a = torch.cumprod(1 - make_betas("linear", 1000), 0)[-1]
    expected = (a * x0.double() ** 2 - a - torch.log(1 - a)).flatten(1).mean(1) / 2 / torch.log(torch.tensor(2.0))
    got = d.prior_bpd(x0)
    assert_close(got.double(), expected, rtol=1e-2, atol=1e-7)  # float32: a tiny KL from cancelling terms
    assert (got[1:] > got[:-1]).all() and got.max() < 1e-4  # the further from 0, the more; all of it tiny
