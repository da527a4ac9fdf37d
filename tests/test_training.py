"""training.py, the one loop: it learns, its EMA follows its formula, clipping reaches Adam, a resumed
run is the unbroken one, the rate it reports, and a method of two networks stepped in turn."""
import pytest
import torch

import training
from checkpoint import load_checkpoint
from config import TrainConfig
from diffusion import Diffusion, DiffusionConfig
from unet import UNet

CPU = torch.device("cpu")




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


class GeneratorAndCritic:
    """A method of two networks with an Adam each, updated in turn on one batch (as a generator and a
    critic would be): part 0 learns to make x0 from noise, part 1 to tell x0 from part 0's output."""

    def __init__(self, generator, critic):
        self.parts, self.order = [generator, critic], []

    def loss(self, k, net, batch):
        self.order.append(k)
        x0 = batch.x0[batch.mine]
        t = torch.zeros(len(x0), dtype=torch.long)
        noise = batch.noise()
        if k == 0:
            return (net(noise, t) - x0).pow(2).mean()
        with torch.no_grad():
            fake = self.parts[0].model(noise, t)
        return (net(x0, t) - 1).pow(2).mean() + net(fake, t).pow(2).mean()  # real: 1, made: 0


def test_a_method_of_two_networks_steps_each_with_its_own_optimizer_in_turn(tiny_config):
    cfg = TrainConfig(steps=5, batch_size=8, log_every=1)
    generator, critic = training.new_part(tiny_config, cfg, CPU), training.new_part(tiny_config, cfg, CPU)
    before = [[p.detach().clone() for p in part.model.parameters()] for part in (generator, critic)]
    method, state = GeneratorAndCritic(generator, critic), training.new_state()
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    training.train(method, images, cfg, CPU, state, lambda: None)
    assert method.order == [0, 1] * 5  # one loop, each part once per step, in the method's order
    for part, old in zip((generator, critic), before):
        assert any(not torch.equal(a, b) for a, b in zip(part.model.parameters(), old))
        assert int(part.ema.n_averaged) == 5 and part.optimizer.state  # its own EMA and Adam
    assert [s for s, _, _ in state["history"]] == [1, 2, 3, 4, 5]  # the first part's loss, each step


def test_a_part_with_every_n_is_stepped_at_multiples_of_n_and_the_first_part_every_step(tiny_config):
    cfg = TrainConfig(steps=7, batch_size=8, log_every=1)
    generator, critic = training.new_part(tiny_config, cfg, CPU), training.new_part(tiny_config, cfg, CPU)
    critic.every = 3
    method, state = GeneratorAndCritic(generator, critic), training.new_state()
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    training.train(method, images, cfg, CPU, state, lambda: None)
    assert method.order == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]  # steps 0, 3 and 6 step part 1 too
    assert int(critic.ema.n_averaged) == 3 and int(generator.ema.n_averaged) == 7
    generator.every = 2
    with pytest.raises(ValueError, match="first part is stepped every step"):
        training.train(GeneratorAndCritic(generator, critic), images, cfg, CPU, training.new_state(),
                       lambda: None)
