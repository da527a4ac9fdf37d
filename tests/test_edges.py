"""Numbers at their edges and resource bombs: every --seed takes what `date +%s%N` prints and refuses
in one line what torch's generators cannot hold; a schedule, a model or a checkpoint's config too
large for the machine is refused before its memory is allocated; a large --n streams to disk."""
import copy
import gc
import weakref
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

import bench
import cli
import distill
import evaluate
import figures
import sample
import train
from checkpoint import build_model, load_checkpoint
from conftest import TINY_FLAGS
from samplers import SamplerConfig, generate
from unet import UNet

NANOSECONDS = "1764763200123456789"  # `date +%s%N` on 2025-12-03: 19 digits


@pytest.mark.parametrize("module", [train, sample, evaluate, distill])
@pytest.mark.parametrize("value", ["-1", "9223372036854775808", "100000000000000000000", "1e3", "nan"])
def test_a_seed_torch_cannot_hold_is_one_line(module, value, tmp_path, fails):
    err = fails(module, ["--seed", value, "--output-dir", tmp_path / "out"])
    assert "argument --seed: must be a whole number from 0 to 9223372036854775807" in err
    assert not (tmp_path / "out").exists()  # refused while parsing, before any folder is made


def test_a_nanosecond_seed_trains_resumes_and_samples(cli):
    r = cli.run("train.py", "--steps", "2", "--max-steps", "1", "--sample-n", "0", "--seed", NANOSECONDS)
    assert r.returncode == 0, r.stderr
    r = cli.run("train.py", "--resume", cli.ckpt, "--sample-n", "0")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(cli.ckpt)
    assert ckpt["step"] == 2 and ckpt["config"]["train"]["seed"] == int(NANOSECONDS)
    r = cli.run("sample.py", "--n", "2", "--steps", "2", "--seed", NANOSECONDS)
    assert r.returncode == 0 and (cli.out / "samples.png").is_file(), r.stderr


def test_a_typo_of_a_schedule_is_refused_before_it_is_made(tmp_path, fails):
    err = fails(train, ["--timesteps", "4000000000", "--data-dir", tmp_path / "d", "--checkpoint-dir",
                        tmp_path / "c", "--output-dir", tmp_path / "o"])
    assert "timesteps must be from 2 to 100000, got 4000000000" in err and not (tmp_path / "c").exists()


def test_a_model_larger_than_the_machine_is_refused_before_it_is_built(cli):
    r = cli.run("train.py", "--width", "65536", "--steps", "1")
    assert r.returncode == 2 and "GiB for its weights, EMA, gradients and Adam alone" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (cli.ckpt / "ckpt.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--width", "100000000000000000000"], "a level of more than 1048576 channels"),
    (["--channel-mults", "1", "100000000000000000000"], "a level of more than 1048576 channels"),
    (["--num-res-blocks", "100000000000000000000"], "num_res_blocks must be from 1 to 100"),
])
def test_a_model_too_large_even_to_plan_is_refused_at_once(cli, flags, message):
    r = cli.run("train.py", *flags, "--steps", "1")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_checkpoint_config_that_claims_more_than_its_weights_is_refused(good_checkpoint, tmp_path, fails):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    config = {**ckpt["config"], "model": {**ckpt["config"]["model"], "width": 1 << 16}}
    torch.save({**ckpt, "config": config}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "out"])
    assert "the config asks for" in err and "the file holds" in err


@pytest.mark.parametrize("device", ["meta", "xpu", "cuda:7", "cpu:x"])
def test_a_device_this_machine_lacks_is_one_line(device, tmp_path, fails, good_checkpoint):
    err = fails(sample, ["--checkpoint", good_checkpoint, "--device", device, "--output-dir", tmp_path / "o"])
    assert f"--device {device}" in err or f"--device '{device}'" in err
    assert not (tmp_path / "o" / "samples.png").exists()


@pytest.mark.parametrize("field, value", [("step", "12"), ("epoch", -1), ("step", 3.5), ("step", True)])
def test_a_step_or_epoch_that_is_not_a_count_is_damaged_and_gives_way_to_the_previous_file(
        good_checkpoint, tmp_path, fails, field, value):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    torch.save({**ckpt, field: value}, tmp_path / "ckpt.pt")
    err = fails(sample, ["--checkpoint", tmp_path, "--output-dir", tmp_path / "out"])
    assert "is damaged: its step and epoch" in err
    (tmp_path / "ckpt.prev.pt").write_bytes(good_checkpoint.read_bytes())
    assert load_checkpoint(tmp_path)["step"] == ckpt["step"]


def _set(ckpt, where, value):
    """ckpt with the field at dotted path `where` set to value (or removed if value is DROP)."""
    *parents, last = where.split(".")
    table = ckpt
    for key in parents:
        table = table[key]
    if value is DROP:
        del table[last]
    else:
        table[last] = value
    return ckpt


DROP = object()


@pytest.mark.parametrize("where, value, message", [
    ("config.model.width", "8", "its config's model.width is '8', not of type int"),
    ("config.model.channel_mults", 2, "model.channel_mults is 2, not of type tuple"),
    ("config.model.num_classes", 10.5, "model.num_classes is 10.5, not of type int"),
    ("config.model.width", DROP, "its config lacks model.width"),
    ("config.diffusion.timesteps", "20", "diffusion.timesteps is '20', not of type int"),
    ("config.diffusion.schedule", 3, "diffusion.schedule is 3, not of type str"),
    ("config.train.lr", "0.1", "train.lr is '0.1', not of type float"),
    ("config.train.batch_size", None, "train.batch_size is None, not of type int"),
    ("history", "abc", "its loss history is not (step, epoch, loss) rows"),
    ("world_size", "1", "its process count is '1'"),
])
def test_a_field_of_the_wrong_type_is_damaged_and_gives_way_to_the_previous_file(
        good_checkpoint, tmp_path, fails, where, value, message):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    torch.save(_set(copy.deepcopy(ckpt), where, value), tmp_path / "ckpt.pt")
    for module, argv in ((sample, ["--checkpoint", tmp_path]), (train, ["--resume", tmp_path])):
        err = fails(module, [*argv, "--output-dir", tmp_path / "out"])
        assert "is damaged" in err and message in err, err
    (tmp_path / "ckpt.prev.pt").write_bytes(good_checkpoint.read_bytes())
    assert load_checkpoint(tmp_path)["step"] == ckpt["step"]


def test_save_npz_and_save_png_stream_every_image_drawn_in_order(good_checkpoint, tmp_path):
    args = ["--n", "300", "--sampler", "ddim", "--steps", "2", "--batch-size", "64", "--seed", "3"]
    sample.main([str(a) for a in ["--checkpoint", good_checkpoint, "--save-npz", tmp_path / "s.npz",
                                  "--save-png", tmp_path / "pngs", "--output-dir", tmp_path / "out", *args]])
    model, diffusion = build_model(load_checkpoint(good_checkpoint), torch.device("cpu"))
    expected = generate(model, diffusion, 300, 3, SamplerConfig("ddim", 2), batch_size=64, progress=False)
    with np.load(tmp_path / "s.npz") as f:
        assert f.files == ["images"]
        np.testing.assert_array_equal(f["images"], sample.to_uint8(expected))
    pngs = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(300)]
    for i in (0, 63, 64, 299):  # either side of a batch's end
        with PIL.Image.open(pngs[i]) as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), sample.to_uint8(expected[i:i + 1])[0])
    # the picture shows the first SHOWN of them, 8 a row: 32 rows of 28 + 2 pixels, scaled 3x
    with PIL.Image.open(tmp_path / "out" / "samples.png") as png:
        assert png.size == (3 * (8 * 30 + 2), 3 * (figures.SHOWN // 8 * 30 + 2))


@pytest.mark.parametrize("num_classes, n, kept", [(0, 640, 256), (10, 400, 16 * 10)])
def test_pictures_keep_only_the_images_they_show(tiny_config, tmp_path, monkeypatch, num_classes, n, kept):
    """Memory flat in n: every batch reaches on_batch, and no batch past the shown ones is held."""
    made, seen = [], []

    def batches(model, diffusion, total, seed, labels=None, **kw):
        for start in range(0, total, 64):
            # each image holds its index, so the ones kept can be named
            x = torch.arange(start, min(start + 64, total)).float().view(-1, 1, 1, 1).expand(-1, 1, 28, 28)
            made.append(weakref.ref(x))
            yield x
            del x

    monkeypatch.setattr(figures, "generate_batches", batches)
    model = UNet(replace(tiny_config, num_classes=num_classes))
    drawn, shown = figures.draw_pictures(model, None, n, tmp_path, on_batch=lambda x: seen.append(len(x)))
    gc.collect()
    assert drawn == n and sum(seen) == n and len(shown) == kept
    per_class = n // 10 if num_classes else n
    expected = [i for i in range(n) if i % per_class < (16 if num_classes else 256)]
    assert shown[:, 0, 0, 0].long().tolist() == expected
    assert not any(ref() is not None for ref in made)


# ---------------------------------------------------------------------------- every numeric flag
COMMANDS = {"train": train, "sample": sample, "evaluate": evaluate, "distill": distill, "bench": bench}


def numeric_flags(kind):
    """(command, flag) of every flag taking whole numbers (kind "whole") or real ones ("real")."""
    return [(name, a.option_strings[-1]) for name, m in COMMANDS.items() for a in m.build_parser()._actions
            if a.option_strings and a.type not in (None, str, cli.seed)
            and (a.type is cli.finite) == (kind == "real")]


def test_every_numeric_flag_is_found():
    assert len(numeric_flags("whole")) == 33 and len(numeric_flags("real")) == 23


@pytest.mark.parametrize("command, flag", numeric_flags("whole") + numeric_flags("real"))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_by_every_numeric_flag_as_it_is_read(command, flag, value, capsys):
    parser = COMMANDS[command].build_parser()
    nargs = next(a.nargs for a in parser._actions if flag in a.option_strings)
    with pytest.raises(SystemExit) as e:  # a pair's second value, as its first is read the same
        parser.parse_args([flag, "1", value] if nargs == 2 else [f"{flag}={value}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}:" in err, err


class Reached(Exception):
    """The command got past every check, to its first piece of real work."""


@pytest.mark.parametrize("command, flag", numeric_flags("whole"))
def test_a_20_digit_count_is_refused_in_one_line_before_any_work(command, flag, cli, good_checkpoint, fails,
                                                               monkeypatch, tmp_path):
    def reach(*args, **kw):
        raise Reached
    for name in ("train.train", "train.plan_length", "sample.draw", "evaluate.load_fashion_mnist",
                 "distill.load_fashion_mnist", "bench.preset_configs"):
        monkeypatch.setattr(name, reach)
    where = {"train": ["--data-dir", cli.data, "--checkpoint-dir", cli.ckpt, *TINY_FLAGS],
             "sample": ["--checkpoint", good_checkpoint], "evaluate": ["--checkpoint", good_checkpoint],
             "distill": ["--teacher", good_checkpoint, "--checkpoint-dir", cli.ckpt, "--teacher-steps", "8",
                         "--to-steps", "4"],
             "bench": ["--json", tmp_path / "b.json"]}[command]
    output = [] if command == "bench" else ["--output-dir", cli.out]
    err = fails(COMMANDS[command], [*where, *output, f"{flag}=100000000000000000000"])
    assert "100000000000000000000" in err and not cli.out.exists()
    # distill.py makes its folder before it reads the rounds saved there: an empty one may stay
    assert not cli.ckpt.exists() or not any(cli.ckpt.rglob("*.pt"))
