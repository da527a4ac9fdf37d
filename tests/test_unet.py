import io
from dataclasses import replace

import pytest
import torch

from diffusion import Diffusion, DiffusionConfig
from samplers import Autoguided, SamplerConfig, generate
from unet import UNet, UNetConfig, count_parameters, counting_evaluations, timestep_embedding


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("config", [UNetConfig(), UNetConfig(width=16, channel_mults=(1, 2, 2, 1), image_size=28 * 2,
                                                              num_res_blocks=1, attn_resolutions=(14, 7))])
def test_output_shape_equals_input_shape(batch, config):
    model = UNet(config)
    x = torch.randn(batch, 1, config.image_size, config.image_size)
    assert model(x, torch.randint(0, 1000, (batch,))).shape == x.shape


def test_gradients_reach_every_parameter(tiny_config):
    model = UNet(tiny_config)
    # The last conv of each block starts at zero, which blocks gradients upstream on step one;
    # give every weight a random value so the test sees the wiring, not the initialisation.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 28, 28)
    model(x, torch.tensor([3, 700])).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_output_depends_on_timestep(tiny_config):
    model = UNet(tiny_config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_timestep_embedding_distinguishes_steps():
    emb = timestep_embedding(torch.arange(1000), 32)
    assert emb.shape == (1000, 32)
    assert torch.cdist(emb, emb).add(torch.eye(1000) * 1e3).min() > 1e-3


def test_config_round_trip_through_a_weights_only_file(tiny_config):
    buf = io.BytesIO()
    torch.save({"config": tiny_config.to_dict()}, buf)
    buf.seek(0)
    restored = UNetConfig.from_dict(torch.load(buf, weights_only=True)["config"])
    assert restored == tiny_config
    assert count_parameters(UNet(restored)) == count_parameters(UNet(tiny_config))


def test_config_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="halved"):
        UNetConfig(channel_mults=(1, 2, 2, 2))  # 28 -> 14 -> 7 -> 3.5
    with pytest.raises(ValueError, match="multiple"):
        UNetConfig(width=12)
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"width": 32, "depth": 3})
    with pytest.raises(ValueError, match="112 channels, which its 3 heads of 32 do not divide"):
        UNetConfig(width=56)  # was a RuntimeError inside attention, mid-run
    with pytest.raises(ValueError, match="feature maps are 28, 14, 7 pixels wide"):
        UNetConfig(attn_resolutions=(5,))
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="channel_mults"):
        UNetConfig(channel_mults=(1, 0, 2))
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(num_res_blocks=0)


@pytest.mark.parametrize("attn", [(7,), (14, 7), (28,)])
def test_every_width_the_config_accepts_runs(attn):
    """What UNetConfig lets through must run: the check up front is the only place a bad width is caught."""
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([10])
    accepted = 0
    for width in range(8, 137, 8):
        try:
            config = UNetConfig(width=width, num_res_blocks=1, attn_resolutions=attn)
        except ValueError:
            continue
        assert UNet(config)(x, t).shape == x.shape, width
        accepted += 1
    assert 5 < accepted < 17  # some widths pass, some are refused


@pytest.mark.parametrize("sampler", [SamplerConfig("ddpm", 5), SamplerConfig("dpm++", 4)])
def test_network_evaluations_are_counted_through_guidance_and_autoguidance(tiny_config, sampler):
    """What evaluate.py calls NFE: one evaluation per image per step; guidance runs the network on
    each image twice (with and without its label), autoguidance two networks."""
    config = replace(tiny_config, num_classes=3)
    model, guide, diffusion = UNet(config), UNet(config), Diffusion(DiffusionConfig(20))
    labels, steps = torch.tensor([0, 1, 2, 0, 1]), sampler.steps
    cases = [(model, 0.0, steps), (model, 1.0, 2 * steps), (Autoguided(model, guide, 1.0), 0.0, 2 * steps),
             (Autoguided(model, guide, 1.0), 1.0, 4 * steps)]
    for net, guidance, expected in cases:
        with counting_evaluations(net) as evaluated:
            generate(net, diffusion, 5, sampler=sampler, batch_size=2, progress=False, labels=labels,
                     guidance=guidance)
        assert evaluated[0] == 5 * expected
    generate(model, diffusion, 5, sampler=sampler, progress=False, labels=labels)
    assert evaluated[0] == 5 * expected  # counting stops at the block's end
