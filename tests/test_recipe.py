"""The training recipe's levers: learning-rate decay, the EMA's length, a planned length in steps,
--max-minutes's plan, and the precision and memory format chosen for the device."""
import math
from dataclasses import replace

import pytest
import torch

import train
import training
from checkpoint import load_checkpoint
from cli import UserError
from device import fastest_settings
from methods import denoising
from config import TrainConfig, resolve_configs
from diffusion import DiffusionConfig
from unet import UNetConfig

CPU = torch.device("cpu")
parse = lambda *argv: train.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_learning_rate_warms_up_then_decays_to_zero_at_the_planned_end(schedule):
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule=schedule)
    lrs = [training.lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])  # every schedule warms up alike
    assert lrs[10] == 1e-3
    after = lrs[10:]
    if schedule == "constant":
        assert set(after) == {1e-3}
    else:
        assert all(a > b for a, b in zip(after, after[1:]))
        assert lrs[60] == pytest.approx(5e-4)  # half way through the decay: cos(pi/2) and the line agree
        last = 1 / 100 if schedule == "linear" else (1 + math.cos(math.pi * 99 / 100)) / 2  # 99 of 100 decay steps
        assert lrs[109] == pytest.approx(1e-3 * last)
        assert training.lr_at(110, cfg, 110) == pytest.approx(0, abs=1e-18)


def test_the_optimizer_steps_with_the_schedule_and_max_steps_does_not_change_it(tmp_path, tiny_config, tiny_run,
                                                                               monkeypatch):
    seen = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: seen.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    cfg = TrainConfig(steps=12, batch_size=8, warmup_steps=2, lr_schedule="cosine", max_steps=5)
    tiny_run(tmp_path, tiny_config, cfg)
    assert seen == [training.lr_at(s, cfg, 12) for s in range(5)]  # planned over 12 steps, though it stops at 5


def test_a_run_of_steps_resumes_exactly_with_every_new_setting(tmp_path, tiny_config, tiny_run):
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    cfg = dict(steps=13, batch_size=8, warmup_steps=2, lr_schedule="cosine", ema_power=3.0, log_every=2,
               memory_format="channels_last", checkpoint_every=100)
    straight, straight_ema, s1 = tiny_run(tmp_path / "a", tiny_config, TrainConfig(**cfg), images)
    tiny_run(tmp_path / "b", tiny_config, TrainConfig(**cfg, max_steps=7), images)
    saved = load_checkpoint(tmp_path / "b")
    assert saved["config"]["train"]["steps"] == 13 and saved["config"]["train"]["memory_format"] == "channels_last"
    resumed, resumed_ema, s2 = tiny_run(tmp_path / "b", tiny_config, TrainConfig(**cfg), images, resume=tmp_path / "b")
    assert s1["step"] == s2["step"] == 13  # 13 steps: past the end of epoch 2 (5 steps each), into epoch 3
    for a, b in ((straight, resumed), (straight_ema, resumed_ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert s1["history"] == s2["history"]


def test_channels_last_trains_the_same_model(tmp_path, tiny_config, tiny_run):
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    runs = {}
    for fmt in ("contiguous", "channels_last"):
        model, _, state = tiny_run(tmp_path / fmt, tiny_config, TrainConfig(steps=2, batch_size=8, memory_format=fmt),
                                   images)
        runs[fmt] = model, state
    conv = next(p for p in runs["channels_last"][0].parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close([v for *_, v in runs["channels_last"][1]["history"]],
                               [v for *_, v in runs["contiguous"][1]["history"]])  # same arithmetic, reordered
    for a, b in zip(runs["contiguous"][0].parameters(), runs["channels_last"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_max_minutes_plans_the_steps_from_the_measured_rate(tiny_config, monkeypatch):
    scratch, _ = denoising(tiny_config, DiffusionConfig(20), TrainConfig(batch_size=8), CPU)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: 10.0)  # steps per second
    in_a_minute = lambda: training.time.time() + 60
    plan = lambda cfg, done=0: training.plan_length(cfg, scratch, images, None, CPU, in_a_minute(), 4, done)
    cfg, rate = plan(TrainConfig(epochs=1000, batch_size=8))
    assert rate == 10 and 570 <= cfg.steps <= 582  # 97% of 600 steps, less the moments the test took
    cfg, _ = plan(TrainConfig(epochs=2, batch_size=8))
    assert cfg.steps == 8  # the run's own end comes first
    cfg, _ = plan(TrainConfig(steps=1000, batch_size=8), done=100)  # the rest, from where a run is
    assert 670 <= cfg.steps <= 682


def test_measuring_the_rate_leaves_the_run_as_it_would_have_been(tiny_config):
    cfg = TrainConfig(steps=6, batch_size=8, log_every=2)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    models = []
    for measure in (False, True):
        method, state = denoising(tiny_config, DiffusionConfig(20), cfg, CPU)
        if measure:  # between setting the run up and training it, as train.py's --max-minutes does
            scratch, _ = denoising(tiny_config, DiffusionConfig(20), cfg, CPU)
            _, rate = training.plan_length(cfg, scratch, images, None, CPU, training.time.time() + 60, 4)
            assert 0 < rate < math.inf
        training.train(method, images, cfg, CPU, state, lambda: None)
        models.append(method.parts[0].model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_a_run_too_short_to_time_keeps_its_own_length(tiny_config):
    scratch, _ = denoising(tiny_config, DiffusionConfig(20), TrainConfig(batch_size=8), CPU)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    cfg, rate = training.plan_length(TrainConfig(steps=3, batch_size=8), scratch, images, None, CPU,
                                     training.time.time() + 60, 4)
    assert rate == math.inf and cfg.steps == 3  # all 3 steps are measure_rate's warm-up: no rate, no plan


def test_the_deadline_stops_the_loop_with_a_checkpoint(tmp_path, tiny_config):
    method, state = denoising(tiny_config, DiffusionConfig(20), TrainConfig(batch_size=8), CPU)
    saves = []
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    stopped = training.train(method, images, TrainConfig(steps=50, batch_size=8), CPU, state,
                             lambda: saves.append(state["step"]), deadline=training.time.time())
    assert stopped == "--max-minutes" and state["step"] == 1 and saves == [1]


def test_max_minutes_plans_a_new_run_that_a_resume_continues(cli, monkeypatch, capsys):
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: 0.05)  # steps/s: 10 minutes afford about 29 steps
    flags = lambda *f: cli.command("train.py", *f, "--sample-n", "0")[2:]
    train.main(flags("--max-minutes", "10", "--epochs", "3"))  # 3 epochs of 256 // 16 steps: 48
    assert "run ends at step" in capsys.readouterr().out
    ckpt = load_checkpoint(cli.ckpt)
    steps = ckpt["config"]["train"]["steps"]
    assert 20 < steps < 30 and ckpt["step"] == steps  # the budget, not the 48 steps of 3 epochs, set its length
    train.main(flags("--resume", cli.ckpt, "--steps", str(steps + 5), "--max-minutes", "10"))  # no new plan
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["step"] == ckpt["config"]["train"]["steps"] == steps + 5
    with pytest.raises(SystemExit):
        train.main(flags("--resume", cli.ckpt, "--epochs", "9"))
    assert "give --steps N" in capsys.readouterr().err


def test_resuming_in_another_memory_format_gives_adam_state_in_the_new_one(tmp_path, tiny_config, tiny_run):
    tiny_run(tmp_path, tiny_config, TrainConfig(steps=2, batch_size=8))
    ckpt = load_checkpoint(tmp_path)
    method, _ = denoising(tiny_config, DiffusionConfig(20),
                          TrainConfig(batch_size=8, memory_format="channels_last"), CPU, ckpt)
    optimizer = method.parts[0].optimizer
    for p, kept in optimizer.state.items():
        for v in (kept["exp_avg"], kept["exp_avg_sq"]):
            assert v.stride() == p.stride()  # as fused Adam on a GPU requires
    assert any(p.dim() == 4 and p.shape[1] > 1 for p in optimizer.state)  # some strides did change


@pytest.mark.parametrize("has_bf16, precision", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_where_the_cpu_has_it_and_stores_the_choice(monkeypatch, has_bf16, precision):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    _, _, cfg, _ = resolve_configs(parse("--precision", "auto", "--memory-format", "auto"), CPU)
    fmt = "contiguous" if precision == "bf16" else "channels_last"  # channels_last slowed bf16 on the Xeon
    assert (cfg.precision, cfg.memory_format) == (precision, fmt)
    _, _, cfg, _ = resolve_configs(parse("--precision", "fp32", "--memory-format", "auto"), CPU)
    assert cfg.memory_format == "channels_last"  # the format follows the precision given
    assert fastest_settings(torch.device("cuda")) == {"precision": "fp32", "memory_format": "contiguous"}
    for preset in ("cpu", "gpu"):  # what both presets ask for, here on a CPU
        _, _, cfg, _ = resolve_configs(parse("--preset", preset), CPU)
        assert (cfg.precision, cfg.memory_format) == (precision, fmt)
    _, _, cfg, _ = resolve_configs(parse("--precision", "fp32", "--memory-format", "contiguous"), CPU)
    assert (cfg.precision, cfg.memory_format) == ("fp32", "contiguous")


def test_the_cpu_preset_is_the_measured_recipe_and_a_length_given_replaces_its_plan():
    model, diffusion, cfg, _ = resolve_configs(parse("--preset", "cpu"), CPU)
    assert (cfg.plan_minutes, cfg.steps, cfg.lr_schedule, cfg.batch_size, cfg.lr, cfg.ema_power) == (
        25.0, 0, "cosine", 64, 1e-3, 4.0)
    assert (diffusion.schedule, diffusion.prediction, diffusion.timesteps) == ("cosine", "eps", 1000)
    assert model.num_classes == 10  # conditional: FID 0.97 against 2.51 (docs/results.md)
    assert cfg.guide_fraction == 0.3  # autoguidance's guide (docs/results.md, "Autoguidance")
    _, _, cfg, _ = resolve_configs(parse("--preset", "cpu", "--epochs", "3"), CPU)
    assert (cfg.steps, cfg.plan_minutes) == (0, 0) and cfg.total_steps(937) == 3 * 937
    _, _, cfg, _ = resolve_configs(parse("--preset", "cpu", "--steps", "700"), CPU)
    assert (cfg.steps, cfg.plan_minutes) == (700, 0)  # the flag given decides the length, not the plan
    model, _, cfg, _ = resolve_configs(parse("--preset", "gpu"), CPU)
    assert cfg.steps == 0 and cfg.total_steps(468) == 40 * 468 and cfg.ema_power == 8.0
    assert (cfg.plan_minutes, model.num_classes, cfg.guide_fraction) == (0, 0, 0)
    model, _, _, _ = resolve_configs(parse("--no-conditional"), CPU)
    assert model.num_classes == 0


@pytest.mark.parametrize("rate, minutes, steps", [
    (10.0, 2.5, 1500),   # 1,500 steps fit exactly
    (9.99, 2.5, 1000),   # 1,498 fit: the multiple of 500 below
    (0.01, 2.5, 500),    # not even one multiple fits: the shortest plan
    (100.0, 25, 150000),
])
def test_a_plan_takes_the_most_whole_multiples_of_500_steps_that_fit(tiny_config, monkeypatch, rate,
                                                                     minutes, steps):
    scratch, _ = denoising(tiny_config, DiffusionConfig(20), TrainConfig(batch_size=8), CPU)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: rate)  # steps per second
    cfg = TrainConfig(plan_minutes=minutes, batch_size=8)
    cfg, measured = training.plan_length(cfg, scratch, images, None, CPU, math.inf, 4)
    assert (cfg.steps, measured) == (steps, rate)
    assert cfg.planned_rate == round(rate * 8, 1)  # images/s, recorded
    cfg, _ = training.plan_length(TrainConfig(plan_minutes=minutes, batch_size=8), scratch, images,
                                  None, CPU, training.time.time() + 60, 4)
    assert cfg.steps <= max(1, min(steps, 0.97 * rate * 60))  # --max-minutes's deadline cuts the plan
    assert cfg.steps < steps  # and it did: a minute is shorter than every plan here


def test_a_planned_run_records_its_plan_and_a_resume_keeps_it(cli, monkeypatch, capsys):
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: 5.0)  # steps/s: 3 min fit 900
    flags = lambda *f: cli.command("train.py", *f, "--sample-n", "0")[2:]
    train.main(flags("--plan-minutes", "3", "--max-steps", "2"))
    out = capsys.readouterr().out
    assert "--plan-minutes 3: 80 img/s measured, so 500 steps" in out and "--steps 500" in out
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["step"] == 2 and ckpt["config"]["train"]["steps"] == 500
    assert (ckpt["config"]["train"]["plan_minutes"], ckpt["config"]["train"]["planned_rate"]) == (3, 80)
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: 50.0)  # a faster machine: no new plan
    train.main(flags("--resume", cli.ckpt, "--max-steps", "3"))
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["step"] == 3 and ckpt["config"]["train"]["steps"] == 500
    assert ckpt["config"]["train"]["planned_rate"] == 80 and "--plan-minutes" not in capsys.readouterr().out


def test_a_rate_too_fast_to_time_plans_nothing_and_records_no_plan(tiny_config, monkeypatch):
    scratch, _ = denoising(tiny_config, DiffusionConfig(20), TrainConfig(batch_size=8), CPU)
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: math.inf)
    cfg, _ = training.plan_length(TrainConfig(plan_minutes=3, epochs=2, batch_size=8), scratch, images,
                                  None, CPU, math.inf, 4)
    assert (cfg.steps, cfg.plan_minutes, cfg.planned_rate) == (8, 0, 0)  # its epochs, and no plan claimed


def test_a_warm_up_longer_than_the_epochs_is_judged_by_the_plan(cli, monkeypatch, capsys):
    monkeypatch.setattr(training, "measure_rate", lambda *a, **k: 50.0)  # 3 min plan 9,000 steps
    train.main(cli.command("train.py", "--plan-minutes", "3", "--warmup-steps", "2000", "--max-steps", "1",
                           "--sample-n", "0", "--lr-schedule", "cosine")[2:])
    assert "so 9000 steps" in capsys.readouterr().out  # not refused over the 2 epochs (32 steps) it replaces
    assert load_checkpoint(cli.ckpt)["config"]["train"]["steps"] == 9000


@pytest.mark.parametrize("flags, message", [
    (["--plan-minutes", "5", "--steps", "100"], "--plan-minutes sets the run's length"),
    (["--plan-minutes", "5", "--epochs", "1"], "--plan-minutes sets the run's length"),
    (["--plan-minutes", "-1"], "--plan-minutes must be from 0 to 100000"),
    (["--plan-minutes", "inf"], "argument --plan-minutes: must be a finite number"),
    (["--plan-minutes", "1e20"], "--plan-minutes must be from 0 to 100000"),
    (["--plan-minutes", "5", "--resume", "{ckpt}", "--batch-size", "8"], "a resumed run keeps its length"),
])
def test_a_plan_that_cannot_apply_is_refused(cli, fails, flags, message, good_checkpoint):
    err = fails(train, cli.command("train.py", *(f.format(ckpt=good_checkpoint) for f in flags))[2:])
    assert message in err and not (cli.ckpt / "ckpt.pt").exists()


@pytest.mark.slow
def test_the_preset_recipe_trains_from_the_command_line(cli):
    """TINY_FLAGS pin the old recipe; here the cpu preset's own (cosine betas and decay, auto precision)."""
    r = cli.run("train.py", "--schedule", "cosine", "--lr-schedule", "cosine", "--precision", "auto",
                "--memory-format", "auto", "--steps", "6", "--warmup-steps", "2", "--sample-n", "2")
    assert r.returncode == 0, r.stderr
    saved = load_checkpoint(cli.ckpt)
    assert saved["step"] == 6 and saved["config"]["diffusion"]["schedule"] == "cosine"
    assert saved["config"]["train"]["precision"] == fastest_settings(CPU)["precision"]  # "auto", stored as chosen
    assert (cli.out / "samples.png").stat().st_size > 0


def test_the_same_seed_and_flags_give_the_same_weights_in_bf16(tmp_path, tiny_config, tiny_run):
    """The default on a CPU with bf16 instructions: its runs must repeat bit for bit, as fp32's do."""
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    cfg = TrainConfig(steps=6, batch_size=8, warmup_steps=2, lr_schedule="cosine", precision="bf16")
    (a, a_ema, _), (b, b_ema, _) = (tiny_run(tmp_path / d, tiny_config, cfg, images) for d in "ab")
    for one, two in ((a, b), (a_ema, b_ema)):
        for (name, x), y in zip(one.state_dict().items(), two.state_dict().values()):
            assert torch.equal(x, y), name
    c, _, _ = tiny_run(tmp_path / "c", tiny_config, replace(cfg, seed=1), images)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))  # the seed does reach the weights


def test_length_flags_that_would_be_ignored_are_refused(fails, tmp_path):
    import train as script
    err = fails(script, ["--steps", "10", "--epochs", "2", "--checkpoint-dir", tmp_path])
    assert "--steps and --epochs" in err
    saved = {"model": UNetConfig(width=16).to_dict(), "diffusion": DiffusionConfig(200).to_dict(),
             "train": TrainConfig(steps=500).recipe()}
    with pytest.raises(UserError, match="this run is 500 steps long"):
        resolve_configs(parse("--resume", "x", "--epochs", "9"), CPU, saved)
    _, _, cfg, _ = resolve_configs(parse("--resume", "x", "--steps", "900"), CPU, saved)
    assert cfg.steps == 900
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):  # resolve_configs resolves "auto"
        TrainConfig(precision="auto")


def test_a_decay_that_would_never_start_is_refused(cli, fails):
    err = fails(train, cli.command("train.py", "--lr-schedule", "cosine", "--steps", "100", "--warmup-steps", "100")[2:])
    assert "fills the run's 100 steps" in err and not (cli.ckpt / "ckpt.pt").exists()
    assert "--lr-schedule constant" in err  # the way out for a user who never chose the preset's cosine decay


