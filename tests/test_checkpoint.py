"""The checkpoint format, in one place: what each version holds, every older version read (the files
in tests/fixtures/ were written by the code of their version), the upgrade of each, the newest and
previous file, atomic saves, and refusals of what cannot be read."""
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import FORMAT, VERSION, build_model, load_checkpoint, save_checkpoint
from cli import UserError, WriteError
from config import TrainConfig, resolve_configs
from diffusion import DiffusionConfig
from methods import student_sampler
from samplers import SamplerConfig
from unet import UNetConfig
from test_distill import distil

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def parse(*argv):
    import train
    return train.build_parser().parse_args(list(argv))


# What a checkpoint of each format version holds. Change a config's fields or the checkpoint's keys, and
# this fails until VERSION is bumped and checkpoint._upgrade() reads the version before (the bug of
# version 1: TrainConfig grew fields under one format string, and older files ended in a KeyError).
LAYOUTS = {2: {
    "keys": ["config", "ema", "ema_updates", "epoch", "format", "history", "model", "optimizer", "step", "version",
             "world_size"],
    "UNetConfig": ["attn_resolutions", "channel_mults", "dropout", "image_size", "in_channels", "num_classes",
                   "num_res_blocks", "width"],
    "DiffusionConfig": ["min_snr_gamma", "prediction", "schedule", "timesteps"],
    "TrainConfig": ["batch_size", "checkpoint_every", "cond_drop", "ema_decay", "epochs", "grad_clip", "log_every",
                    "lr", "precision", "seed", "warmup_steps"],
}}
LAYOUTS[3] = {**LAYOUTS[2], "keys": sorted(LAYOUTS[2]["keys"] + ["timestep_history"]),
              "UNetConfig": sorted(LAYOUTS[2]["UNetConfig"] + ["learned_variance"]),
              "DiffusionConfig": sorted(LAYOUTS[2]["DiffusionConfig"] + ["loss", "variance"])}
LAYOUTS[4] = {**LAYOUTS[3], "TrainConfig": sorted(LAYOUTS[3]["TrainConfig"] + ["ema_power", "lr_schedule",
                                                                            "memory_format", "steps"])}
LAYOUTS[5] = {**LAYOUTS[4], "keys": sorted(LAYOUTS[4]["keys"] + ["distillation"])}
LAYOUTS[6] = LAYOUTS[5]  # a student's distillation record gained its sampler (test_checkpoint.py checks the upgrade)
LAYOUTS[7] = LAYOUTS[6]  # a student's sampler became a SamplerConfig, its step count inside
LAYOUTS[8] = {**LAYOUTS[7], "TrainConfig": sorted(LAYOUTS[7]["TrainConfig"] + ["plan_minutes", "planned_rate"])}
LAYOUTS[9] = {**LAYOUTS[8], "keys": sorted(LAYOUTS[8]["keys"] + ["guide"]),
              "TrainConfig": sorted(LAYOUTS[8]["TrainConfig"] + ["guide_fraction"])}
LAYOUTS[10] = {**LAYOUTS[9], "keys": sorted(LAYOUTS[9]["keys"] + ["parts"])}  # a method's other networks
LAYOUTS[11] = LAYOUTS[10]  # a DMD run's record gained its regression term's weight and anchor


def test_the_checkpoint_version_changes_with_what_a_checkpoint_holds(good_checkpoint):
    from dataclasses import fields

    import checkpoint
    from config import TrainConfig
    from diffusion import DiffusionConfig
    from unet import UNetConfig

    ckpt = checkpoint.load_checkpoint(good_checkpoint)
    now = {"keys": sorted(ckpt), "UNetConfig": sorted(f.name for f in fields(UNetConfig)),
           "DiffusionConfig": sorted(f.name for f in fields(DiffusionConfig)),
           "TrainConfig": sorted(TrainConfig().recipe())}
    assert now == LAYOUTS[checkpoint.VERSION], "bump checkpoint.VERSION, upgrade the old version, record it here"


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path, tiny_config, tiny_run):
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    model, ema, _ = tiny_run(tmp_path, tiny_config, TrainConfig(epochs=1, batch_size=8, warmup_steps=1), images)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 2 and ckpt["epoch"] == 0 and ckpt["ema_updates"] == 2
    for source, use_ema in ((model, False), (ema.module, True)):
        rebuilt, diffusion = build_model(ckpt, ema=use_ema)
        assert rebuilt.config == model.config and diffusion.timesteps == 20
        for a, b in zip(source.state_dict().values(), rebuilt.state_dict().values()):
            assert torch.equal(a, b)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    minimal = {"format": FORMAT, "version": VERSION, "model": {}, "ema": {}, "ema_updates": 0, "optimizer": {},
               "config": {"model": asdict(UNetConfig()), "diffusion": asdict(DiffusionConfig()),
                          "train": TrainConfig().recipe()}, "epoch": 0, "history": [], "distillation": None,
               "parts": []}
    save_checkpoint({**minimal, "step": 1}, tmp_path)
    save_checkpoint({**minimal, "step": 2}, tmp_path)
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "ckpt.prev.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]
    (tmp_path / "ckpt.pt").unlink()  # as if killed between the two renames
    assert load_checkpoint(tmp_path)["step"] == 1


def test_a_second_networks_weights_that_are_not_finite_are_refused(good_checkpoint, tmp_path):
    ckpt = load_checkpoint(good_checkpoint)
    critic = {k: v.clone() for k, v in ckpt["model"].items()}
    name = next(k for k, v in critic.items() if v.is_floating_point())
    critic[name][...] = float("nan")
    torch.save({**ckpt, "parts": [{"model": critic, "optimizer": {}}]}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=rf"its parts\[0\] weights hold NaN or Inf \(first in {name}\)"):
        load_checkpoint(tmp_path)


def version_1(ckpt):
    """The checkpoint as train.py wrote it before the format was versioned: format string '/1', an RNG
    state, the per-command limits in the config, and no fields that TrainConfig gained later."""
    old_train = {k: v for k, v in ckpt["config"]["train"].items() if k not in ("precision", "cond_drop", "grad_clip")}
    v1 = {k: v for k, v in ckpt.items() if k not in ("version", "world_size", "timestep_history")}
    config = ckpt["config"]
    return {**v1, "format": "ddpm-fashion-mnist/1", "rng": {"cpu": torch.get_rng_state()},
            "config": {"model": {k: v for k, v in config["model"].items() if k != "learned_variance"},
                       "diffusion": {k: v for k, v in config["diffusion"].items() if k not in ("variance", "loss")},
                       "train": {**old_train, "max_steps": 3, "compile": True}}}


def test_older_checkpoints_load_and_newer_ones_say_so(good_checkpoint, tmp_path, fails):
    import sample

    ckpt = load_checkpoint(good_checkpoint)
    torch.save(version_1(ckpt), tmp_path / "v1.pt")
    upgraded = load_checkpoint(tmp_path / "v1.pt")
    assert (upgraded["format"], upgraded["version"], upgraded["world_size"]) == (FORMAT, VERSION, 1)
    assert "rng" not in upgraded and "max_steps" not in upgraded["config"]["train"]
    assert upgraded["config"]["train"]["precision"] == "fp32" and upgraded["config"]["train"]["grad_clip"] == 0.0
    assert upgraded["config"]["diffusion"] == ckpt["config"]["diffusion"] and upgraded["timestep_history"] is None
    sample.main(["--checkpoint", str(tmp_path / "v1.pt"), "--output-dir", str(tmp_path / "out"), "--n", "2",
                 "--steps", "2"])
    assert (tmp_path / "out" / "samples.png").is_file()
    model_cfg, _, cfg, _ = resolve_configs(parse("--resume", "x"), torch.device("cpu"), upgraded["config"])
    assert model_cfg.width == 8 and cfg.max_steps == 0 and not cfg.compile  # was a KeyError

    torch.save({**ckpt, "version": None}, tmp_path / "none.pt")  # ours, but no version: damaged, not newer
    assert "is damaged: its format version is None" in fails(sample, ["--checkpoint", tmp_path / "none.pt"])
    torch.save({**ckpt, "version": VERSION + 1}, tmp_path / "v3.pt")
    err = fails(sample, ["--checkpoint", tmp_path / "v3.pt", "--output-dir", tmp_path / "o3"])
    assert f"version {VERSION + 1}, and this code reads versions 1 to {VERSION}" in err
    assert not (tmp_path / "o3").exists()


def test_a_version_2_checkpoint_reads_as_fixed_small_and_resumes(good_checkpoint, tmp_path, tiny_config, tiny_run):
    ckpt = load_checkpoint(good_checkpoint)
    config = ckpt["config"]
    v2 = {**{k: v for k, v in ckpt.items() if k != "timestep_history"}, "version": 2, "config": {
        **config, "model": {k: v for k, v in config["model"].items() if k != "learned_variance"},
        "diffusion": {k: v for k, v in config["diffusion"].items() if k not in ("variance", "loss")}}}
    torch.save(v2, tmp_path / "ckpt.pt")
    upgraded = load_checkpoint(tmp_path)
    assert upgraded["config"] == config and upgraded["timestep_history"] is None
    model, d = build_model(upgraded)
    assert d.config.variance == "fixed_small" and model.out[-1].out_channels == 1
    cfg = TrainConfig(**{**upgraded["config"]["train"], "epochs": 2})
    assert tiny_run(tmp_path, tiny_config, cfg, resume=tmp_path)[2]["step"] == 8


def test_a_version_3_checkpoint_resumes_with_the_recipe_it_was_trained_with(good_checkpoint):
    import checkpoint
    ckpt = load_checkpoint(good_checkpoint)
    new = ("steps", "lr_schedule", "ema_power", "memory_format")
    v3 = {**ckpt, "version": 3, "config": {**ckpt["config"], "train": {
        k: v for k, v in ckpt["config"]["train"].items() if k not in new}}}
    upgraded = checkpoint._upgrade(v3, good_checkpoint)
    assert upgraded["config"]["train"] == {**v3["config"]["train"], "steps": 0, "lr_schedule": "constant",
                                           "ema_power": 8.0, "memory_format": "contiguous"}
    assert replace(TrainConfig(), **upgraded["config"]["train"]) == TrainConfig(**ckpt["config"]["train"])


def test_a_student_records_its_sampler_and_a_version_5_student_reads_as_the_one_it_used(cli, good_checkpoint,
                                                                                         tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "ckpt.pt").write_bytes(b"")  # a file in the working folder is not a --resume
    monkeypatch.chdir(tmp_path / "cwd")
    distil(cli, good_checkpoint, "--to-steps", 4)
    ckpt = load_checkpoint(cli.ckpt / "4-steps")
    record = ckpt["distillation"]
    assert ckpt["version"] == checkpoint.VERSION and record["sampler"] == student_sampler(4).to_dict()
    v5 = {k: v for k, v in record.items() if k != "sampler"} | {"steps": 4}  # as version 5 kept it
    torch.save({**ckpt, "version": 5, "distillation": v5}, cli.out / "v5.pt")
    upgraded = load_checkpoint(cli.out / "v5.pt")["distillation"]
    assert upgraded["sampler"] == student_sampler(4).to_dict() and upgraded.keys() == record.keys()
    assert SamplerConfig.from_flags(None, None, None, 20, SamplerConfig(**record["sampler"])) == student_sampler(4)


def test_a_save_that_dies_midway_leaves_the_old_checkpoint(tmp_path, good_checkpoint, monkeypatch):
    ckpt = load_checkpoint(good_checkpoint)
    save_checkpoint(ckpt, tmp_path)

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint({**ckpt, "step": 999}, tmp_path)
    assert load_checkpoint(tmp_path)["step"] == ckpt["step"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


# ---------------------------------------------------------------------------- files older code wrote

PLAIN = ["v1.pt", "v2.pt", "v3.pt", "v4.pt", "v4-conditional.pt", "v5.pt", "v6.pt", "v7.pt", "v8.pt"]
GUIDED = ["v9.pt", "v10.pt"]  # from version 9, the cpu preset's run keeps an early EMA as a guide
STUDENTS = ["v5-student.pt", "v6-student.pt"]
ONE_RUN = ["v10-dmd.pt", "v10-ect.pt"]  # --method dmd and ect runs, stopped at step 2 of 6


@pytest.mark.parametrize("name", PLAIN + GUIDED + STUDENTS)
def test_every_older_file_loads_in_todays_layout_and_samples(name, tmp_path):
    import sample
    ckpt = load_checkpoint(FIXTURES / name)
    assert ckpt["version"] == VERSION and ckpt["format"] == FORMAT
    model, diffusion = build_model(ckpt)
    assert model.config.width == 8 and diffusion.timesteps == 20
    train = ckpt["config"]["train"]
    assert (train["plan_minutes"], train["planned_rate"]) == (0, 0)  # no older run planned its length
    kept = name in GUIDED
    assert (train["guide_fraction"] > 0, ckpt["guide"] is not None) == (kept, kept)
    if ckpt["distillation"]:  # a student samples with the sampler it was distilled for, and no other
        assert SamplerConfig(**ckpt["distillation"]["sampler"]) == student_sampler(2)
        checkpoint.build_teacher(ckpt)
    sample.main(["--checkpoint", str(FIXTURES / name), "--output-dir", str(tmp_path), "--n", "3",
                 "--save-npz", str(tmp_path / "s.npz")])
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "s.npz").is_file()


@pytest.mark.parametrize("name", PLAIN + GUIDED)
def test_every_older_file_resumes(name, cli):
    import train
    (cli.ckpt).mkdir(parents=True)
    (cli.ckpt / "ckpt.pt").write_bytes((FIXTURES / name).read_bytes())
    before = load_checkpoint(cli.ckpt)
    train.main([str(a) for a in ["--resume", cli.ckpt, "--epochs", 3, "--max-steps", before["step"] + 2,
                                 "--sample-n", 0, "--data-dir", cli.data, "--output-dir", cli.out]])
    after = load_checkpoint(cli.ckpt)
    assert after["step"] == before["step"] + 2 and after["version"] == VERSION
    assert after["config"]["model"] == before["config"]["model"]
    assert not torch.equal(after["model"]["out.2.weight"], before["model"]["out.2.weight"])


def test_a_version_1_file_resumes_with_the_model_flags_it_was_trained_with(cli):
    """The version-1 upgrade once rebuilt attn_resolutions as a list, so that the same flags given again
    (a tuple) read as a change of model and were refused."""
    import train
    (cli.ckpt).mkdir(parents=True)
    (cli.ckpt / "ckpt.pt").write_bytes((FIXTURES / "v1.pt").read_bytes())
    train.main([str(a) for a in ["--resume", cli.ckpt, "--epochs", 3, "--max-steps", 33, "--sample-n", 0,
                                 "--width", 8, "--channel-mults", 1, 2, "--attn-resolutions", 14,
                                 "--data-dir", cli.data, "--output-dir", cli.out]])
    assert load_checkpoint(cli.ckpt)["step"] == 33


@pytest.mark.parametrize("name", STUDENTS)
def test_an_older_student_teaches_the_next_round(name, cli):
    import distill
    (cli.ckpt / "2-steps").mkdir(parents=True)
    (cli.ckpt / "2-steps" / "ckpt.pt").write_bytes((FIXTURES / name).read_bytes())
    distill.main([str(a) for a in ["--resume", cli.ckpt, "--to-steps", 1, "--sample-n", 0,
                                   "--data-dir", cli.data, "--output-dir", cli.out]])
    student = load_checkpoint(cli.ckpt / "1-steps")
    assert student["distillation"]["sampler"] == student_sampler(1).to_dict()
    assert student["distillation"]["round"] == 2 and student["step"] == 10


@pytest.mark.parametrize("name", ONE_RUN)
def test_an_older_dmd_or_ect_run_reads_resumes_and_samples(name, cli):
    """Version 11 gave DMD the regression term: an older run reads with it off and no anchor, and
    goes on to its end; its networks train on, and it is written back in today's version."""
    import distill
    import sample
    raw = torch.load(FIXTURES / name, weights_only=True)
    folder = cli.ckpt / "2-steps"
    folder.mkdir(parents=True)
    (folder / "ckpt.pt").write_bytes((FIXTURES / name).read_bytes())
    record, old = load_checkpoint(folder)["distillation"], raw["distillation"]
    if "matching" in old:  # DMD: the term off and no anchor; the rest as it was written
        assert (record["matching"], record["anchor"]) == ({**old["matching"], "anchor": 0.0}, None)
    assert record.keys() - {"anchor"} == old.keys() and record["sampler"] == old["sampler"]
    distill.main([str(a) for a in ["--resume", cli.ckpt, "--data-dir", cli.data,
                                   "--output-dir", cli.out, "--sample-n", 0]])
    after = torch.load(folder / "ckpt.pt", weights_only=True)
    assert (after["step"], after["version"]) == (6, VERSION)
    assert after["distillation"].get("anchor") is None  # resumed as it ran: without the term
    assert len(after["parts"]) == len(raw["parts"]) == ("matching" in old)  # DMD's critic
    weights = [(after["model"], raw["model"])] + [(a["model"], b["model"])
                                                  for a, b in zip(after["parts"], raw["parts"])]
    for new, before in weights:  # each network trained on
        assert any(not torch.equal(new[k], before[k]) for k in before)
    sample.main([str(a) for a in ["--checkpoint", folder, "--output-dir", cli.out, "--n", 3]])
    assert (cli.out / "samples.png").is_file()


@pytest.mark.parametrize("change, message", [
    (lambda r: {k: v for k, v in r.items() if k != "steps"}, "names its step count and its grid"),
    (lambda r: {**r, "steps": True}, "steps must be a whole number"),
    (lambda r: {**r, "sampler": {**r["sampler"], "eta": "0"}}, "eta must be a number from 0 to 1"),
    (lambda r: {**r, "sampler": {**r["sampler"], "sampler": "euler"}}, "unknown sampler 'euler'"),
    (lambda r: {**r, "steps": 21}, "21 steps of a diffusion of 20"),  # version 6 kept steps here
])
def test_a_damaged_student_record_is_one_line_and_gives_way_to_the_previous_file(change, message,
                                                                                  tmp_path, fails):
    import sample
    ckpt = torch.load(FIXTURES / "v6-student.pt", weights_only=True)
    torch.save({**ckpt, "distillation": change(ckpt["distillation"])}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path, "--output-dir", tmp_path / "out"])
    assert "is damaged: its student's sampler" in err and message in err
    (tmp_path / "ckpt.prev.pt").write_bytes((FIXTURES / "v6-student.pt").read_bytes())
    assert load_checkpoint(tmp_path)["distillation"]["sampler"] == student_sampler(2).to_dict()
