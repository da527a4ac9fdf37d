import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import evaluate
from cli import UserError
from conftest import wait_for
from metrics import frechet_distance, kernel_inception_distance, precision_recall
from samplers import GUIDANCE, SamplerConfig


def exact_gaussian_sets(n=500, d=8, seed=0):
    """Two feature sets whose sample covariances are exactly diagonal, with known means and spreads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal columns, each summing to zero
    sa, sb = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    scale = (n - 1) ** 0.5
    return q * scale * sa + mu_a, q * scale * sb + mu_b, (mu_a - mu_b).pow(2).sum() + (sa - sb).pow(2).sum()


def test_fid_matches_the_closed_form_for_commuting_covariances():
    a, b, expected = exact_gaussian_sets()
    assert_close(torch.tensor(frechet_distance(a, b), dtype=torch.float64), expected, rtol=1e-9, atol=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 32, generator=g) @ torch.randn(32, 32, generator=g)
    assert abs(frechet_distance(feats, feats)) < 1e-6 * feats.var(0).sum().item()
    noisy = [frechet_distance(feats, feats + s * torch.randn(feats.shape, generator=g)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert noisy == sorted(noisy) and noisy[0] > 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    same = kernel_inception_distance(a, b, subset_size=500)
    noisy = [kernel_inception_distance(a, b + s * torch.randn(b.shape, generator=g), subset_size=500)
             for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.1 * noisy[0]
    assert noisy == sorted(noisy)
    assert kernel_inception_distance(a, b, seed=3) == kernel_inception_distance(a, b, seed=3)


def test_precision_and_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 8, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # Two far-apart modes, and a generator that makes only one: all it makes is realistic, half is missing.
    two_modes = torch.cat([real[:500] - 50, real[500:] + 50])
    assert precision_recall(two_modes, two_modes[:500]) == (1.0, 0.5)


@pytest.fixture
def scored_checkpoint(cli):
    assert cli.run("train.py", "--max-steps", "4", "--sample-n", "0").returncode == 0
    return cli


@pytest.mark.slow
def test_evaluate_end_to_end_is_reproducible(scored_checkpoint, capsys):
    cli = scored_checkpoint
    argv = ["--checkpoint", cli.ckpt, "--data-dir", cli.data, "--classifier-dir", cli.ckpt, "--output-dir", cli.out,
            "--n", "40", "--sweep", "--grid", "ddpm:5", "ddim:3", "dpm++:3"]
    cache = cli.ckpt / "classifier.pt"
    results, said = [], []
    for spoil in (None, "damage", "other data"):
        if spoil == "damage":
            cache.write_bytes(cache.read_bytes()[:500])
        elif spoil == "other data":
            saved = torch.load(cache, weights_only=True)
            torch.save({**saved, "key": {**saved["key"], "data": "0123456789abcdef"}}, cache)
        evaluate.main([str(a) for a in argv])
        results.append(json.loads((cli.out / "eval.json").read_text()))
        said.append(capsys.readouterr().out)
    assert "trained the evaluation classifier" in said[0] and "test accuracy" in said[0]
    assert "classifier.pt is damaged" in said[1] and "training a new one" in said[1]
    assert "was trained on other data or settings; training a new one" in said[2]
    assert cache.is_file() and (cli.out / "fid_vs_steps.png").stat().st_size > 0
    rows = [[{k: v for k, v in r.items() if k != "images_per_s"} for r in res["rows"]] for res in results]
    assert rows[0] == rows[1] == rows[2]  # same seed, same numbers (the retrained classifier included)
    names = [r["name"] for r in rows[0]]
    # A grid entry without ETA takes the sampler's default, as sample.py does: the SDE form for dpm++.
    samplers = ("ddpm-5", "ddim-3 eta=0", "dpm++-3 eta=1")
    assert names == ["real train images"] + [f"{s} {w}" for w in ("ema", "raw") for s in samplers]
    assert [r["nfe"] for r in rows[0][1:4]] == [5, 3, 3]
    assert all(sum(r["classes"].values()) == 40 for r in rows[0])


@pytest.mark.parametrize("args, message", [
    (["--grid", "ddpm:0"], "is not SAMPLER:STEPS"),
    (["--grid", "euler:10"], "is not SAMPLER:STEPS"),
    (["--grid", "dpm++:20:2"], "ETA in [0, 1]"),
    (["--grid", "ddpm:10:1"], "ETA in [0, 1]"),
    (["--n", "3"], "argument --n: must be a whole number from 4 to 100000, got '3'"),
    (["--n", "100001"], "argument --n: must be a whole number from 4 to 100000"),
    (["--sampler", "euler"], "invalid choice"),
    (["--steps", "10"], "--sweep scores every --grid entry with both weights: drop --steps"),
    (["--eta", "0"], "--sweep scores every --grid entry with both weights: drop --eta"),  # 0 too
    (["--sampler", "ddim", "--no-ema"], "drop --sampler, --no-ema"),
    (["--guidance-sweep", "0", "1"], "--sweep and --guidance-sweep are separate evaluations"),
    (["--guidance", "1"], "need a class-conditional checkpoint"),
    (["--unconditional"], "need a class-conditional checkpoint"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number from 1 to 65536"),
    (["--autoguidance", "0.5"], "keeps none"),
    (["--autoguidance", "nan"], "argument --autoguidance: must be a finite number"),
    (["--autoguidance", "-1"], "--autoguidance must be 0 (off) or more"),
    (["--guide", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    (["--eps-scale", "0"], "--eps-scale must be above 0"),
    (["--eps-scale", "inf"], "argument --eps-scale: must be a finite number"),
])
def test_evaluate_bad_arguments(args, message, good_checkpoint, tmp_path, fails):
    err = fails(evaluate, ["--checkpoint", good_checkpoint, "--output-dir", tmp_path / "o", "--sweep", *args])
    assert message in err
    assert not (tmp_path / "o").exists()


def test_evaluate_refuses_a_foreign_checkpoint(tmp_path, fails):
    torch.save({"format": "other"}, tmp_path / "x.pt")
    assert "not a checkpoint of this project" in fails(evaluate, ["--checkpoint", tmp_path / "x.pt"])


@pytest.mark.parametrize("args, message", [
    (["--grid", "ddim:10"], "--grid lists what --sweep scores: add --sweep"),
    (["--guidance-sweep", "0", "2"], "need a class-conditional checkpoint"),  # was a KeyError
    (["--eta", "1", "--sampler", "ddpm"], "--eta applies to ddim and dpm++"),
])
def test_evaluate_refuses_flags_it_would_ignore(args, message, good_checkpoint, tmp_path, fails):
    err = fails(evaluate, ["--checkpoint", good_checkpoint, "--output-dir", tmp_path / "o", *args])
    assert message in err
    assert not (tmp_path / "o").exists()


def test_guidance_flags_on_a_conditional_model_asked_for_no_class_are_refused():
    args = evaluate.build_parser().parse_args(["--unconditional", "--guidance-sweep", "0", "2"])
    with pytest.raises(UserError, match="where guidance has nothing to steer"):  # was a KeyError
        evaluate.plan(args, 20, conditional=True)


@pytest.mark.parametrize("argv, expected", [
    ([], SamplerConfig("dpm++", 20, 1.0, "logsnr")),  # what sample.py draws by default
    (["--sampler", "ddim"], SamplerConfig("ddim", 50, 0.0, "time")),  # --steps 20 was applied to all
    (["--sampler", "ddpm"], SamplerConfig("ddpm", 1000, None, "time")),
    (["--sampler", "dpm++", "--eta", "0", "--steps", "10"], SamplerConfig("dpm++", 10, 0.0, "logsnr")),
])
def test_a_single_evaluation_scores_what_sample_py_would_draw(argv, expected):
    [(weights, settings, guidance)] = evaluate.plan(evaluate.build_parser().parse_args(argv), 1000, False)
    assert (weights, settings, guidance) == ("ema", expected, GUIDANCE)


def test_guidance_and_a_guidance_sweep_are_not_both_taken():
    args = evaluate.build_parser().parse_args(["--guidance", "1", "--guidance-sweep", "0", "2"])
    with pytest.raises(UserError, match="--guidance-sweep scores its own scales: drop --guidance"):
        evaluate.plan(args, 20, conditional=True)


def test_the_default_sweep_fits_a_model_with_fewer_timesteps():
    runs = evaluate.plan(evaluate.build_parser().parse_args(["--sweep"]), 20, False)  # was: "ddpm:1000" refused
    assert max(sampler.steps for _, sampler, _ in runs) == 20
    assert len(runs) == len({(w, s) for w, s, _ in runs})  # no row twice


def test_the_default_sweep_includes_the_default_sampler():
    runs = evaluate.plan(evaluate.build_parser().parse_args(["--sweep"]), 1000, False)
    assert ("ema", SamplerConfig("dpm++", 20, 1.0, "logsnr"), GUIDANCE) in runs
    assert ("ema", SamplerConfig("dpm++", 20, 0.0, "logsnr"), GUIDANCE) in runs  # and the ODE
    assert {w for w, *_ in runs} == {"ema", "raw"}


@pytest.mark.slow
def test_a_sweep_over_several_checkpoints_compares_their_ema_weights(scored_checkpoint):
    cli, other = scored_checkpoint, scored_checkpoint.ckpt.parent / "copy"
    other.mkdir()
    shutil.copy(cli.ckpt / "ckpt.pt", other / "ckpt.pt")
    evaluate.main([str(a) for a in ["--checkpoint", cli.ckpt, other, "--data-dir", cli.data, "--classifier-dir",
                                    cli.ckpt, "--output-dir", cli.out, "--n", "20", "--sweep", "--grid", "ddpm:4"]])
    result = json.loads((cli.out / "eval.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["real train images", f"{cli.ckpt} ddpm-4 ema", f"{other} ddpm-4 ema"]
    assert result["rows"][1]["fid"] == result["rows"][2]["fid"]  # the same weights and seed: the same images
    assert result["step"] == {str(cli.ckpt): 4, str(other): 4} and (cli.out / "fid_vs_steps.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_sweep_keeps_the_rows_it_scored(scored_checkpoint, sig):
    cli = scored_checkpoint
    argv = ["--checkpoint", cli.ckpt, "--data-dir", cli.data, "--classifier-dir", cli.ckpt, "--output-dir", cli.out,
            "--n", "200", "--sweep", "--grid", "ddpm:4", "ddpm:20", "ddim:20", "dpm++:20", "--batch-size", "1"]
    # one image at a time: each row after the first takes seconds, so the signal finds the sweep unfinished
    proc = subprocess.Popen([sys.executable, str(cli.root / "evaluate.py"), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cli.root)
    wait_for(proc, "ddpm-4 ema")  # the first row is scored and printed
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 130 and "Traceback" not in err, err
    result = json.loads((cli.out / "eval.json").read_text())
    assert result["complete"] is False and 2 <= len(result["rows"]) < 9  # the floor, and what was scored
    assert result["rows"][1]["name"] == "ddpm-4 ema" and "before the interrupt" in out
