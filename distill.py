"""Progressive distillation (Salimans & Ho 2022): `python distill.py` halves a trained model's
sampling steps round by round, 64 -> 32 -> ... -> 4 by default; then
`python sample.py --checkpoint checkpoints/distilled/4-steps`.

Each round's student starts as a copy of its teacher and learns to take, in one deterministic DDIM
step, the two steps its teacher takes; it then teaches the next round. The students predict v
(sec. 4 of the paper). A thin command line over the rounds: the objective is methods.Distillation,
the loop training.train. `python distill.py --method dmd --student checkpoints/distilled/1-steps`
trains one student further, towards the teacher's distribution (DMD2: matching.py);
`python distill.py --method ect` tunes the trained model into a 4-step one on data alone (ECT:
consistency.py)."""
import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from checkpoint import (CHECKPOINT_NAMES, build_model, build_teacher, make_checkpoint,
                        open_checkpoint, restore, save_checkpoint, teacher_checkpoint)
from cli import (MAX_BATCH, MAX_IMAGES, MAX_STEPS, ArgumentParser, check, check_writable,
                 finite, given, run_command, seed, whole)
from consistency import ConsistencyConfig, start_tuning, tuning
from config import MEMORY_FORMATS, PRECISIONS, TrainConfig
from data import load_fashion_mnist, prepare_fashion_mnist
from device import fastest_settings, pick_device
from diffusion import Diffusion
from figures import draw_pictures, save_students
from folders import ROUND, locked, saved_rounds, take_folder
from matching import JOINS, MatchingConfig, matching, start_matching
from methods import (Distillation, halvings, reached_by_halving, student_diffusion,
                     student_sampler)
from samplers import AUTOGUIDANCE, GUIDANCE, SamplerConfig
from training import new_part, new_state, train

# What --resume takes from the checkpoints, never from the flags: the recipe and what is distilled.
RECIPE_FLAGS = ("teacher", "teacher_steps", "round_steps", "batch_size", "lr", "warmup_steps",
                "guidance", "seed", "precision", "memory_format", "checkpoint_every", "overwrite",
                "method", "student", "autoguidance", "generator_sampler", "gan_weights", "anchor")
# A new distillation's settings where a flag is left out: the CPU recipe (docs/results.md,
# "Progressive distillation").
DEFAULTS = dict(teacher_steps=64, to_steps=4, round_steps=1000, batch_size=64, lr=2e-4,
                warmup_steps=50, seed=0, checkpoint_every=250)
# --method dmd's, where a flag is left out: its one round (docs/results.md, "Distribution matching")
DMD_DEFAULTS = dict(round_steps=2000, batch_size=64, lr=5e-5, warmup_steps=100, seed=0,
                    checkpoint_every=250)
# --method ect's: its one run (docs/results.md, "Consistency tuning")
ECT_DEFAULTS = dict(round_steps=4000, batch_size=64, lr=2e-4, warmup_steps=100, seed=0,
                    checkpoint_every=250)
# one-run methods, saved in N-steps/ as rounds are: (defaults, record key, config, name)
ONE_RUN = {"dmd": (DMD_DEFAULTS, "matching", MatchingConfig, "distribution matching"),
           "ect": (ECT_DEFAULTS, "consistency", ConsistencyConfig, "consistency tuning")}
# the flags only --method dmd takes: refused with the other methods
DMD_FLAGS = ("student", "autoguidance", "generator_sampler", "gan_weights", "anchor")
# where a run's students and pictures go, by --method, without --checkpoint-dir, --output-dir
FOLDERS = {"progressive": ("checkpoints/distilled", "output/distilled"),
           "dmd": ("checkpoints/dmd", "output/dmd"), "ect": ("checkpoints/ect", "output/ect")}


def distill_round(n, teacher, teacher_diffusion, record, cfg, images, labels, device, folder,
                  saved=None):
    """Train the student that takes n steps (from `saved`, (a checkpoint of this round, its file),
    if given), saving it in folder: the Distillation method on the one training loop. Returns why it
    stopped early, or None."""
    ckpt, file = saved or (None, None)
    part, state, diffusion = (new_part(teacher.config, cfg, device), new_state(),
                              Diffusion(student_diffusion(teacher_diffusion.config)).to(device))
    if ckpt is not None:
        restore(ckpt, part, state)
    else:  # theta <- eta: the student starts where its teacher is
        part.model.load_state_dict(teacher.state_dict())
    # only the trained model is guided: each later teacher is a student that learned it
    guidance = record["guidance"] if record["round"] == 1 else 0.0
    method = Distillation(teacher, teacher_diffusion, diffusion, n, guidance, part=part)
    record = {**record, "sampler": student_sampler(n).to_dict(),
              "teacher": teacher_checkpoint(teacher, teacher_diffusion)}

    def save():
        save_checkpoint(make_checkpoint(part, diffusion, cfg.recipe(), state, 1,
                                        distillation=record), folder)

    # leftovers; a damaged ckpt.pt aside
    take_folder(folder, folder if ckpt else None, file, overwrite=False)
    return train(method, images, cfg, device, state, save, labels)


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument

    def d(key):  # a flag's default, and --method dmd's and ect's where they differ
        other = {k: v[0].get(key, DEFAULTS.get(key)) for k, v in ONE_RUN.items()}
        return "(" + "; ".join([f"{DEFAULTS[key]:g}"] + [
            f"--method {k}: {v:g}" for k, v in other.items() if v != DEFAULTS[key]]) + ")"
    a("--method", choices=("progressive", *ONE_RUN),
      help="progressive distillation, round by round (progressive); distribution matching "
           "(DMD2) of one distilled --student (dmd); or consistency tuning (ECT) of the "
           "--teacher (ect)")
    a("--student", help="--method dmd: the distilled student (file or folder) the generator "
                        "starts from; it takes as many steps")
    a("--teacher", help="the trained checkpoint (file or folder) whose EMA weights teach the first "
                        "round (checkpoints; --method dmd: the one the --student came from; "
                        "--method ect: the one tuned)")
    a("--teacher-steps", type=int, help="the first teacher's DDIM steps; each student takes "
                                        "half " + d("teacher_steps"))
    a("--to-steps", type=int, help="the last student's steps, reached by halving "
                                   "--teacher-steps; --method ect: the tuned model's "
                                   + d("to_steps"))
    a("--round-steps", type=whole(1, MAX_STEPS), help="optimizer steps per round " + d("round_steps"))
    a("--batch-size", type=whole(1, MAX_BATCH), help="images per step " + d("batch_size"))
    a("--lr", type=finite, help="Adam learning rate after warm-up, decaying linearly to 0 in each "
                               "round, constant for --method dmd and ect " + d("lr"))
    a("--warmup-steps", type=int, help="steps of linear learning-rate warm-up in each "
                                       "round " + d("warmup_steps"))
    a("--guidance", type=finite, help=f"conditional teachers: the guidance scale w the students "
                                     f"learn ({GUIDANCE:g}); --method dmd: the --student's")
    a("--autoguidance", type=finite, metavar="W", help=f"--method dmd: the real score, the teacher "
      f"autoguided at W ({AUTOGUIDANCE:g} if it keeps a guide, as its default sampler)")
    a("--generator-sampler", choices=JOINS,
      help=f"--method dmd: what joins the generator's steps: fresh noise (renoise, DMD2) or the "
           f"--student's deterministic DDIM step (ddim) ({MatchingConfig.sampler})")
    a("--gan-weights", type=finite, nargs=2, metavar=("G", "CRITIC"),
      help=f"--method dmd: the GAN term's weight in the generator's and in the critic's loss "
           f"({MatchingConfig.gan_generator:g} {MatchingConfig.gan_critic:g}, DMD2's)")
    a("--anchor", type=finite, metavar="W", help=f"--method dmd: weight of DMD's regression term, "
      f"pulling G's x_0 to the --student's at each input ({MatchingConfig.anchor:g}: off)")
    a("--seed", type=seed, help="seed for data order, timesteps and noise, the same in each "
                               "round " + d("seed"))
    a("--precision", choices=PRECISIONS, help="the student's: fp32, bf16 autocast, or auto as in "
                                              "train.py (auto); the teacher's targets: fp32")
    a("--memory-format", choices=MEMORY_FORMATS, help="the student's memory layout (auto)")
    a("--checkpoint-every", type=whole(1, MAX_STEPS), help="steps between checkpoints within a "
                                           "round " + d("checkpoint_every"))
    where = "(%s; --method dmd: %s; ect: %s)"
    a("--checkpoint-dir", help="where each round's student goes, in N-steps/ "
                               + where % tuple(c for c, _ in FOLDERS.values()))
    a("--output-dir", help="where each round's samples and students.png go "
                           + where % tuple(o for _, o in FOLDERS.values()))
    a("--resume", metavar="DIR", help="continue the distillation in this --checkpoint-dir, "
                                      "with its settings")
    a("--overwrite", action="store_true", help="replace the --checkpoint-dir's distillation")
    a("--max-steps", type=whole(0, MAX_STEPS),
      help="optimizer steps this command takes, over its rounds, then stop (0: no limit)")
    a("--sample-n", type=whole(0, MAX_IMAGES), default=64,
      help="images drawn by each round's student into its samples.png (64)")
    a("--data-dir", default="data", help="where Fashion-MNIST is looked for and kept (data)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    return p


def settings_from(args, found, device):
    """(the first teacher, its diffusion, the record every round shares, the TrainConfig of each
    round, the last student's steps): from the flags for a new distillation, from its checkpoints
    for --resume."""
    if args.resume:
        check(found, f"--resume {args.resume}: no distilled student there to continue; start one "
                     f"with `python distill.py --checkpoint-dir {args.resume}`")
        (first, file), (last, _) = found[max(found)], found[min(found)]
        check(first["distillation"]["round"] == 1,
              f"{file} is from round {first['distillation']['round']}, and the first round's "
              f"folder is missing: cannot continue without it")
        record = {k: v for k, v in first["distillation"].items() if k != "teacher"}
        teacher, teacher_diffusion = build_teacher(first, device)  # round 1's: the trained model
        cfg = TrainConfig(**first["config"]["train"])
        # the latest aim
        to_steps = last["distillation"]["to_steps"] if args.to_steps is None else args.to_steps
        return teacher, teacher_diffusion, record, cfg, to_steps
    check(not found or args.overwrite, f"{args.checkpoint_dir}/ already holds a distillation "
          f"({', '.join(ROUND.format(n) for n in sorted(found, reverse=True))}): continue it "
          f"with --resume {args.checkpoint_dir}, replace it with --overwrite, or choose another "
          f"--checkpoint-dir")
    ckpt, file = open_checkpoint(args.teacher or "checkpoints")
    check(ckpt["distillation"] is None,
          f"{file} is a distilled student, not a trained model: to halve its steps further, "
          f"continue its distillation with --resume DIR --to-steps N")
    teacher, teacher_diffusion = build_model(ckpt, device)
    conditional = teacher.config.num_classes > 0
    check(conditional or args.guidance is None,
          "--guidance applies to class-conditional teachers; this one is unconditional: "
          "drop --guidance")
    check(args.guidance is None or args.guidance >= 0,
          f"--guidance must be 0 or more, got {args.guidance}")
    first_steps = DEFAULTS["teacher_steps"] if args.teacher_steps is None else args.teacher_steps
    to_steps = DEFAULTS["to_steps"] if args.to_steps is None else args.to_steps
    guidance = (GUIDANCE if args.guidance is None else args.guidance) if conditional else 0.0
    record = {"round": 1, "from_steps": first_steps, "to_steps": to_steps,
              "guidance": guidance, "source": {"checkpoint": str(file), "step": ckpt["step"]}}
    cfg = round_config(args, DEFAULTS, device, "linear")
    check(first_steps <= teacher_diffusion.timesteps,
          f"--teacher-steps {first_steps}: the teacher has only {teacher_diffusion.timesteps} "
          f"timesteps")
    return teacher, teacher_diffusion, record, cfg, to_steps


def round_config(args, defaults, device, lr_schedule):
    """A round's TrainConfig from the flags, `defaults` where one is left out."""
    flag = {k: defaults[k] if getattr(args, k) is None else getattr(args, k)
            for k in ("round_steps", "batch_size", "lr", "warmup_steps", "seed",
                      "checkpoint_every")}
    chosen = fastest_settings(device, args.precision or "auto", args.memory_format or "auto")
    values = dict(steps=flag["round_steps"], batch_size=flag["batch_size"], lr=flag["lr"],
                  lr_schedule=lr_schedule, warmup_steps=flag["warmup_steps"], seed=flag["seed"],
                  precision=chosen["precision"], memory_format=chosen["memory_format"],
                  checkpoint_every=flag["checkpoint_every"])
    for name in ("steps", "batch_size", "lr", "checkpoint_every"):
        check(values[name] > 0, f"--{'round-steps' if name == 'steps' else name.replace('_', '-')} "
                                f"must be positive, got {values[name]}")
    check(0 <= values["warmup_steps"] < values["steps"],
          f"--warmup-steps must be 0 or more and fewer than --round-steps ({values['steps']}), "
          f"got {values['warmup_steps']}")
    return TrainConfig(**values)


def training_data(args, cfg, device, output_dir):
    """(--output-dir, else output_dir; the training images and labels on device), checked."""
    out = check_writable(args.output_dir or output_dir, "--output-dir")
    prepare_fashion_mnist(args.data_dir)
    images, labels = load_fashion_mnist(args.data_dir)
    check(cfg.batch_size <= len(images),
          f"--batch-size {cfg.batch_size} is larger than the {len(images)} training images")
    return out, images.to(device), labels.to(device)


def run(args):
    check(not (args.resume and args.checkpoint_dir
               and Path(args.resume) != Path(args.checkpoint_dir)),
          "--resume continues the distillation where it is saved: drop --checkpoint-dir")
    if args.resume:  # checked before check_writable() below makes the folder
        where = Path(args.resume)
        check(where.is_dir(),
              f"--resume {where}: no such folder; give the --checkpoint-dir of a distillation")
        check(not any((where / name).is_file() for name in CHECKPOINT_NAMES),
              f"--resume {where} holds one round's student: give the folder above it, "
              f"--resume {where.parent}")
    device = pick_device(args.device)
    args.checkpoint_dir = Path(args.resume or args.checkpoint_dir
                               or FOLDERS[args.method or "progressive"][0])
    ckpt_dir = check_writable(args.checkpoint_dir, "--checkpoint-dir", args.resume
                              and "a distillation goes on where it was saved: copy the folder "
                                  "somewhere writable and --resume the copy")
    with locked(ckpt_dir):  # from here on no other run changes what is in it
        found = saved_rounds(ckpt_dir)
        recipe = given(args, *RECIPE_FLAGS) if args.resume else []  # --seed 0 is given too
        check(not recipe, f"--resume continues the distillation with the settings in its "
                          f"checkpoints: drop {', '.join(recipe)}")
        kinds = {c["distillation"].get("method", "progressive") for c, _ in found.values()}
        check(len(kinds) < 2, f"{ckpt_dir}/ holds runs of several methods "
                              f"({', '.join(sorted(kinds))}): keep them in separate folders")
        kind = args.method if args.method in ONE_RUN else args.resume and next(
            (k for k in kinds if k in ONE_RUN), None)
        check(not kind or kinds <= {kind}, f"{ckpt_dir}/ holds a distillation of another method "
                                           f"({', '.join(kinds)}): choose another --checkpoint-dir")
        if kind:
            return run_one(kind, args, ckpt_dir, found, device)
        dmd_only = given(args, *DMD_FLAGS)
        check(not dmd_only, f"{', '.join(dmd_only)} applies to --method dmd: add it, or drop "
                            f"{', '.join(dmd_only)}")
        teacher, teacher_diffusion, record, cfg, to_steps = settings_from(args, found, device)
        first_steps = record["from_steps"]
        check(reached_by_halving(first_steps, to_steps),
              f"--to-steps {to_steps} is not reached by halving the first teacher's {first_steps} "
              f"steps: give a power of two below it, such as --teacher-steps 64 --to-steps 4")
        out, images, labels = training_data(args, cfg, device, FOLDERS["progressive"][1])
        if args.overwrite:  # every check has passed: the earlier distillation goes
            for n in found:
                for name in CHECKPOINT_NAMES:
                    (ckpt_dir / ROUND.format(n) / name).unlink(missing_ok=True)
            found = {}
        print(f"distilling {record['source']['checkpoint']} (step {record['source']['step']}): "
              f"{' -> '.join(str(n) for n in [first_steps, *halvings(first_steps, to_steps)])} "
              f"steps, {cfg.steps} optimizer steps a round, batch {cfg.batch_size}, "
              f"lr {cfg.lr:g} ({cfg.precision}), on {device}")
        rounds = [(r, n, ckpt_dir / ROUND.format(n), found.get(n))
                  for r, n in enumerate(halvings(first_steps, to_steps), 1)]
        if distill_rounds(rounds, teacher, teacher_diffusion, {**record, "to_steps": to_steps}, cfg,
                          images, labels, device, out, args.sample_n,
                          args.max_steps or math.inf):
            save_students(ckpt_dir, out / "students.png", device, cfg.seed)
        else:
            print(f"to continue: python distill.py --resume {ckpt_dir}")


def new_run(kind, args, found, ckpt_dir, device):
    """(method, state, save_to, its config, TrainConfig) of a new --method dmd or ect run."""
    check(args.teacher_steps is None, f"--teacher-steps applies to progressive distillation: "
                                      f"drop it, or drop --method {kind}")
    if kind == "dmd":
        check(args.guidance is None, "--method dmd matches the teacher guided as the student "
                                     "learned it: drop --guidance")
        teacher, student, config, source = start_matching(args.teacher, args.student,
                                                          args.to_steps, args.autoguidance,
                                                          args.generator_sampler,
                                                          args.gan_weights, args.anchor)
    else:
        other = given(args, *DMD_FLAGS, "guidance")
        check(not other, f"--method ect tunes the trained model on data alone, unguided: drop "
                         f"{', '.join(other)}")
        teacher, config, source = start_tuning(args.teacher, args.to_steps)
    check(config.steps not in found or args.overwrite,
          f"{ckpt_dir}/{ROUND.format(config.steps)} already holds a run of --method {kind}: "
          f"continue it with --resume {ckpt_dir}, replace it with --overwrite, or choose another "
          f"--checkpoint-dir")
    cfg = round_config(args, ONE_RUN[kind][0], device, "constant")
    built = (matching(teacher, student, config, cfg, device, source) if kind == "dmd"
             else tuning(teacher, config, cfg, device, source))
    return (*built, config, cfg)


def run_one(kind, args, ckpt_dir, found, device):
    """--method dmd or ect: one run (matching.py, consistency.py) saved in ckpt_dir/N-steps/ as
    progressive distillation's rounds are; or its continuation, --resume."""
    _, record_key, Config, what = ONE_RUN[kind]
    if args.resume:
        check(args.to_steps is not None or len(found) == 1,
              f"--resume {ckpt_dir} holds {kind.upper()} runs for {sorted(found)} steps: say "
              f"which with --to-steps N")
        steps = args.to_steps if args.to_steps is not None else next(iter(found))
        check(steps in found, f"--resume {ckpt_dir}: no {steps}-step run there; it holds "
                              f"{sorted(found)}")
        saved, _ = found[steps]
        cfg = TrainConfig(**saved["config"]["train"])
        config = Config(**saved["distillation"][record_key])
        method, state, save_to = (
            matching(None, None, config, cfg, device, None, saved) if kind == "dmd"
            else tuning(None, config, cfg, device, None, saved))
    else:
        method, state, save_to, config, cfg = new_run(kind, args, found, ckpt_dir, device)
    folder = ckpt_dir / ROUND.format(config.steps)
    out, images, labels = training_data(args, cfg, device, FOLDERS[kind][1])
    folder.mkdir(parents=True, exist_ok=True)
    take_folder(folder, folder if args.resume else None,
                found[config.steps][1] if args.resume else None, overwrite=bool(args.overwrite))
    critic = (f" ({config.critic_updates} critic steps per generator step)" if kind == "dmd"
              else "")
    print(f"{what}: a {config.steps}-step model, {cfg.steps} steps{critic}, batch "
          f"{cfg.batch_size}, lr {cfg.lr:g} ({cfg.precision}), on {device}")
    limit = replace(cfg, max_steps=state["step"] + args.max_steps if args.max_steps else 0)
    stopped = train(method, images, limit, device, state, lambda: save_to(folder), labels)
    if stopped or state["step"] < cfg.steps:
        print(f"stopped at step {state['step']} of {cfg.steps} by {stopped or '--max-steps'}; "
              f"to continue: python distill.py --resume {ckpt_dir}")
        return
    ckpt, _ = open_checkpoint(folder)
    model, diffusion = build_model(ckpt, device)
    if args.sample_n:
        where = check_writable(out / folder.name, "--output-dir")
        draw_pictures(model, diffusion, args.sample_n, where, cfg.seed,
                      learned=ckpt["distillation"]["guidance"],
                      sampler=SamplerConfig(**ckpt["distillation"]["sampler"]))
        print(f"wrote {where / 'samples.png'}")


def distill_rounds(rounds, teacher, teacher_diffusion, record, cfg, images, labels, device, out,
                   sample_n, budget):
    """Train each round [(round, student steps, folder, (its checkpoint, file) or None)] not yet
    finished, each student teaching the next, and draw each new student's samples. budget: the
    optimizer steps this command may take. Returns whether every round is finished."""
    for r, n, folder, saved in rounds:
        if saved is not None and saved[0]["step"] >= cfg.steps:  # finished: it teaches the next
            teacher, teacher_diffusion = build_model(saved[0], device)
            continue
        if saved is not None:  # a round cut short: resumed against the teacher it kept
            teacher, teacher_diffusion = build_teacher(saved[0], device)
        start, started = saved[0]["step"] if saved else 0, time.time()
        limit = replace(cfg, max_steps=start + budget if math.isfinite(budget) else 0)
        stopped = distill_round(n, teacher, teacher_diffusion, {**record, "round": r}, limit,
                                images, labels, device, folder, saved)
        ckpt, _ = open_checkpoint(folder)
        budget -= ckpt["step"] - start
        if stopped or ckpt["step"] < cfg.steps:
            print(f"stopped in round {r} at step {ckpt['step']} of {cfg.steps} "
                  f"by {stopped or '--max-steps'}")
            return False
        history = [v for *_, v in ckpt["history"][-100:]]
        print(f"round {r}: the {n}-step student trained in {(time.time() - started) / 60:.1f} min, "
              f"loss {sum(history) / len(history):.4g} over its last {len(history)} steps; "
              f"saved in {folder}/")
        teacher, teacher_diffusion = build_model(ckpt, device)  # as a resumed run loads it
        if sample_n:
            sampler = SamplerConfig(**ckpt["distillation"]["sampler"])
            where = check_writable(out / folder.name, "--output-dir")
            draw_pictures(teacher, teacher_diffusion, sample_n, where, cfg.seed,
                          learned=record["guidance"], sampler=sampler)
            print(f"wrote {where / 'samples.png'} ({sampler.describe()})")
        if budget <= 0 and rounds[-1][0] != r:  # the budget ran out with this round
            print(f"stopped after round {r} by --max-steps")
            return False
    return True


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
