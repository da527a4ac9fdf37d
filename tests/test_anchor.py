"""DMD's regression term (matching.py, --anchor): G's x_0 pulled towards the frozen student it
started from, at the same inputs. Against closed forms with affine generators, then as distill.py
runs it: recorded, kept on --resume, bitwise resumable, and absent from older checkpoints."""
import math

import pytest
import torch
from torch.testing import assert_close

import distill
import matching
from checkpoint import load_checkpoint
from config import TrainConfig
from matching import MatchingConfig
from test_matching import (Affine, Gaussian, MU, S, batch, changed, dmd, flat,  # noqa: F401
                           pd, tensors)
from training import Batch, Part, take_step


def anchored(G, anchor, weight):
    """A 1-step DMD of G whose critic is the real score: the matching gradient is then exactly
    zero (test_matching), and what moves G is the regression term alone."""
    config = MatchingConfig(steps=1, gan_generator=0.0, gan_critic=0.0, anchor=weight)
    critic = Gaussian(MU, S**2)
    return matching.DistributionMatching(
        Gaussian(MU, S**2), critic.d, G.d, Part(critic, None),
        Part(G, torch.optim.Adam(G.parameters(), lr=0.02)), config, anchor)


def test_the_regression_term_is_the_weighted_mse_to_the_anchors_x0():
    """For G = b + A z and the anchor b' + A' z at the same noise z, the term is
    w mean(((b - b') + (A - A') z)^2)."""
    G, anchor = Affine(1.0, -0.4), Affine(0.5, 0.3)
    x0, term = anchored(G, anchor, 0.7).anchored(G, batch(), None)
    z, _ = anchored(G, anchor, 0.7).inputs(G, batch(), None)  # the same draws: the same noise
    assert_close(x0, -0.4 + 1.0 * z)
    assert_close(term, 0.7 * ((-0.4 - 0.3) + (1.0 - 0.5) * z).pow(2).mean())
    assert anchored(G, anchor, 0.0).anchored(G, batch(), None)[1] == 0  # off: no term
    with pytest.raises(ValueError, match="needs the anchor network"):
        anchored(G, None, 0.5)
    for bad in ({"anchor": -1.0}, {"anchor": math.inf}, {"anchor": math.nan},
                {"gan_generator": math.inf}):
        with pytest.raises(ValueError, match="0 or more, finite"):
            MatchingConfig(**bad)


def test_with_nothing_to_match_the_update_takes_g_to_its_anchor():
    """The critic is the real score, so only the regression term acts: a few hundred steps of the
    implemented update take (A, b) to the anchor's; a swapped sign would take them away."""
    G, anchor = Affine(1.0, -0.4), Affine(0.5, 0.3)
    dmd_, before = anchored(G, anchor, 1.0), tensors(anchor)
    opt = dmd_.parts[1].optimizer
    for step in range(300):
        opt.zero_grad()
        dmd_.generator_loss(G, batch(seed=step)).backward()
        opt.step()
    assert abs(G.A.item() - 0.5) < 0.01 and abs(G.b.item() - 0.3) < 0.01, (G.A, G.b)
    assert not changed(before, anchor) and anchor.A.grad is None and anchor.b.grad is None


def test_a_generator_update_changes_g_and_never_the_anchor(good_checkpoint, pd):
    """G is its anchor at this first step (no dropout here), so the term is zero: what is
    checked is that nothing reaches the anchor (that the term acts, the next test shows)."""
    teacher, student = load_checkpoint(good_checkpoint), load_checkpoint(pd)
    cfg = TrainConfig(batch_size=8, lr=1e-3, precision="fp32")
    config = MatchingConfig(steps=2, critic_updates=1, anchor=0.5)
    method, _, _ = matching.matching(teacher, student, config, cfg, torch.device("cpu"), {})
    anchor, generator = method.anchor, method.parts[1].model
    assert all(torch.equal(v, student["ema"][k]) for k, v in anchor.state_dict().items())
    before, g_before = tensors(anchor), tensors(generator)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    b = Batch(x0, torch.arange(8) % 10, torch.Generator().manual_seed(0), slice(None))
    take_step(method, [p.model for p in method.parts], b, cfg, 1e-3, torch.device("cpu"), step=1)
    assert changed(g_before, generator) and not changed(before, anchor)
    assert all(p.grad is None for p in anchor.parameters())


def test_the_anchor_is_the_runs_and_resume_keeps_it_bitwise(cli, good_checkpoint, pd, fails):
    dmd(cli, good_checkpoint, pd, "--anchor", 0.5, "--max-steps", 4)
    ckpt = lambda folder="dmd": load_checkpoint(cli.ckpt / folder / "2-steps")
    record, student = ckpt()["distillation"], load_checkpoint(pd)
    assert record["matching"]["anchor"] == 0.5
    assert record["anchor"].keys() == student["ema"].keys()
    assert all(torch.equal(v, student["ema"][k]) for k, v in record["anchor"].items())
    resume = ["--resume", cli.ckpt / "dmd", "--data-dir", cli.data, "--output-dir", cli.out,
              "--sample-n", 0]
    assert "drop --anchor" in fails(distill, [*resume, "--anchor", 0])  # 0 is a value too
    distill.main([str(a) for a in resume])
    dmd(cli, good_checkpoint, pd, "--anchor", 0.5, folder="unbroken")
    (step_a, a, history_a), (step_b, b, history_b) = (flat(cli.ckpt / f / "2-steps")
                                                      for f in ("dmd", "unbroken"))
    assert step_a == step_b == (6, 2) and history_a == history_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    after = ckpt()["distillation"]
    assert after["matching"]["anchor"] == 0.5
    assert all(torch.equal(v, record["anchor"][k]) for k, v in after["anchor"].items())
    # the term acts: the same run without it ends elsewhere
    dmd(cli, good_checkpoint, pd, folder="free")
    weights = lambda folder: ckpt(folder)["model"]["conv_in.weight"]
    assert not torch.equal(weights("free"), weights("dmd"))


@pytest.mark.parametrize("case, args, expected", [
    ("negative", ["--anchor", -1], "--anchor must be 0 (off) or more, got -1"),
    ("not dmd", ["--method", "progressive", "--student", "", "--anchor", 1],
     "--anchor applies to --method dmd"),
    ("ect", ["--method", "ect", "--student", "", "--anchor", 1], "drop --student, --anchor"),
])
def test_bad_anchors_are_refused_in_one_line(cli, good_checkpoint, pd, fails, case, args,
                                             expected):
    err = fails(distill, ["--method", "dmd", "--teacher", good_checkpoint, "--student", pd,
                          "--data-dir", cli.data, "--checkpoint-dir", cli.ckpt / "dmd",
                          "--output-dir", cli.out, *args])
    assert expected in err and not list(cli.ckpt.rglob("*.pt"))


def test_a_version_10_progressive_student_reads_without_dmds_fields(tmp_path, pd):
    """Version 11 changed DMD's record alone (a version-10 DMD run, written by that version's code,
    is read and resumed in test_checkpoint.py)."""
    student = torch.load(pd / "ckpt.pt", weights_only=True)
    torch.save({**student, "version": 10}, tmp_path / "pd10.pt")
    upgraded = load_checkpoint(tmp_path / "pd10.pt")["distillation"]
    assert upgraded.keys() == student["distillation"].keys() and "anchor" not in upgraded
