"""The `tfadv` command line, end to end on tiny settings."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import pytest

CLI = [sys.executable, "-m", "tfadv.cli"]
TINY = ["--limit", "300", "--steps", "2", "--eval-steps", "2", "--batch-size", "50"]


def run(args, timeout=600, env=None, check=True):
    out = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run(["train", "mnist", "--epochs", "2", "--out", str(out), "--seed", "3", *TINY])
    return out


def test_train_writes_model_history_metrics(trained):
    import tfadv  # noqa: F401

    model = keras.saving.load_model(str(trained / "model.keras"), safe_mode=True)
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    hist = json.load(open(trained / "history.json"))
    assert hist["epoch"] == [0, 1]
    for key in ("accuracy", "loss", "val_accuracy", "val_robust_accuracy"):
        assert len(hist[key]) == 2, key
    metrics = json.load(open(trained / "metrics.json"))
    t = metrics["test"]
    assert t["n"] == 300 and 0 <= t["robust_accuracy"] <= t["clean_accuracy"] <= 1
    assert metrics["config"]["method"] == "pgd"
    assert not (trained / "backup").exists()  # removed after a finished run


def test_eval_json_worst_case(trained):
    out = run(["eval", str(trained / "model.keras"), "--attack", "pgd", "--attack", "fgsm",
               "--eps", "0.1", "--steps", "5", "--step-size", "0.03", "--limit", "100", "--json"])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["per_attack"]) == {"pgd", "fgsm"}
    assert res["robust_accuracy"] <= min(res["per_attack"].values()) <= res["clean_accuracy"]
    assert res["n"] == 100


def test_eval_apgd_cw_and_checks(trained):
    out = run(["eval", str(trained / "model.keras"), "--attack", "apgd", "--attack", "cw",
               "--norm", "2", "--eps", "1.0", "--steps", "10", "--limit", "50", "--check"])
    assert "robust accuracy" in out.stdout and "gradient-masking checks" in out.stdout


def test_curve_writes_json_and_png(trained, tmp_path):
    prefix = tmp_path / "c"
    run(["curve", str(trained / "model.keras"), "--eps", "0,0.1,0.3", "--steps", "3",
         "--limit", "100", "--out", str(prefix)])
    curve = json.load(open(str(prefix) + ".json"))
    assert curve["eps"] == [0, 0.1, 0.3] and len(curve["accuracy"]) == 3
    assert open(str(prefix) + ".png", "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("args,msg", [
    (["train", "mnist", "--out", "x", "--eps", "-1"], "expected a number >= 0"),
    (["train", "mnist", "--out", "x", "--epochs", "0"], "expected an integer >= 1"),
    (["train", "mnist", "--out", "x", "--data", "tfds"], "data_dir"),
    (["eval", "/nonexistent/model.keras"], "No model at"),
    (["curve", "m.keras", "--out", "p", "--eps", "0,a"], "comma-separated"),
    (["train", "cifar", "--out", "x"], "invalid choice"),
])
def test_bad_input_is_a_clear_error(args, msg):
    out = run(args, check=False)
    assert out.returncode == 2
    assert msg in out.stderr
    assert "Traceback" not in out.stderr


def _kill_after_epochs(proc, hist, epochs, sig=signal.SIGKILL):
    """Signals `proc` (SIGKILL) once its history file lists `epochs` epochs; returns the
    epochs listed."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and len(json.load(open(hist))["epoch"]) >= epochs:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(sig)
    proc.wait()
    return json.load(open(hist))["epoch"]


def test_ctrl_c_says_how_to_resume_and_a_resume_must_keep_the_settings(tmp_path):
    """Ctrl-C: exit 130 with the resume hint, no traceback. Resuming with another learning
    rate is refused (the message names it); the same command resumes; a finished run is
    not trained over."""
    out_dir = tmp_path / "run"
    args = ["train", "mnist", "--epochs", "3", "--out", str(out_dir), *TINY]
    # As from a terminal: SIGINT at its default (a test runner's worker may ignore it, and
    # a child inherits that).
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    hist = out_dir / "history.json"
    done = _kill_after_epochs(proc, hist, 1, sig=signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted. Run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    other = run([*args, "--lr", "0.002"], check=False)
    assert other.returncode == 2
    assert "other settings (--lr: 0.001 -> 0.002)" in other.stderr
    run(args)
    assert json.load(open(hist))["epoch"] == [*done, *range(len(done), 3)]
    model = out_dir / "model.keras"
    before = model.stat().st_mtime_ns
    again = run(args, check=False)
    assert again.returncode == 2 and "holds a finished run" in again.stderr
    assert "--overwrite" in again.stderr and model.stat().st_mtime_ns == before


@pytest.mark.parametrize("torn_write", [False, True])
def test_resume_after_kill(tmp_path, torn_write):
    """SIGKILL mid-run, start again with the same --out: no finished epoch is lost or repeated.

    torn_write: the kill landed while the weights backup was being written
    (simulated by truncating it); the previous backup is used instead.
    """
    out_dir = tmp_path / "run"
    args = ["train", "mnist", "--epochs", "5", "--out", str(out_dir), *TINY]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    hist = out_dir / "history.json"
    need = 2 if torn_write else 1
    done = _kill_after_epochs(proc, hist, need)
    assert need <= len(done) < 5
    assert (out_dir / "backup").exists()
    if torn_write:
        latest = out_dir / "backup" / "latest.weights.h5"
        latest.write_bytes(latest.read_bytes()[:1000])

    second = run(args)
    final = json.load(open(hist))
    assert final["epoch"] == [0, 1, 2, 3, 4]
    # The restarted run began after a backed-up epoch, not from scratch.
    assert "Epoch 1/5" not in second.stdout
    assert (out_dir / "model.keras").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_strategy_two_processes(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen(
            CLI + ["train", "mnist", "--epochs", "1", "--strategy", "multi-worker",
                   "--out", str(tmp_path / f"w{i}"), *TINY],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    chief = json.load(open(tmp_path / "w0" / "metrics.json"))
    assert chief["replicas"] == 2
    assert (tmp_path / "w0" / "model.keras").exists()
    assert not (tmp_path / "w1" / "model.keras").exists()  # only the chief writes


def test_multi_worker_needs_tf_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    out = subprocess.run(CLI + ["train", "mnist", "--strategy", "multi-worker", "--out",
                                str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2 and "TF_CONFIG" in out.stderr


@pytest.mark.slow
def test_centers_quick_writes_the_whole_report(tmp_path):
    out = tmp_path / "study"
    run(["centers", "--quick", "--out", str(out), "--epochs", "1", "--limit", "300",
         "--eval-limit", "100"], timeout=900)
    results = json.load(open(out / "results.json"))
    assert set(results["models"]) == {"A", "B", "C", "D"}
    assert set(results["examples"]) == {"train", "test"}
    a = results["models"]["A"]
    assert {"inverse vs learned", "inverse vs clean", "inverse vs weights",
            "clean vs learned", "inverse vs uiat"} <= set(a["comparisons"])
    assert "learned" not in results["models"]["B"]["centers"]
    for name in ("features.png", "cosine_heatmaps.png", "report.md"):
        assert (out / name).stat().st_size > 0
    report = open(out / "report.md").read()
    assert "Answer:" in report and "| A |" in report
    for m in "ABCD":
        assert (out / f"model_{m}.keras").exists()


def test_centers_rejects_unknown_models(tmp_path, capsys):
    from tfadv.cli import main

    assert main(["centers", "--out", str(tmp_path), "--models", "A,Z"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfadv centers: error:") and "Expected models" in err


def test_centers_study_resumes_mid_model_after_kill(tmp_path):
    """SIGKILL during a study model's training: the rerun continues from its last epoch."""
    out_dir = tmp_path / "study"
    args = ["centers", "--quick", "--models", "A", "--epochs", "8", "--eval-limit", "100",
            "--no-uiat", "--out", str(out_dir)]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    hist = out_dir / "backup" / "A" / "history.json"
    done = _kill_after_epochs(proc, hist, 2)
    assert 2 <= len(done) < 8

    second = run(args, timeout=600)
    assert "Epoch 1/8" not in second.stdout
    results = json.load(open(out_dir / "results.json"))
    a = results["models"]["A"]
    # One history row per epoch, the killed run's rows kept, not repeated.
    assert len(a["history"]["loss"]) == 8
    assert a["train_seconds"] > 0
    # The backup is gone once the model's results are kept.
    assert not (out_dir / "backup" / "A").exists()
    assert (out_dir / "models_done" / "A.json").exists()


def test_centers_options_reach_the_study_config(tmp_path):
    from tfadv.cli import build_parser, centers_config

    args = build_parser().parse_args(
        ["centers", "--out", str(tmp_path), "--adv-eps", "0.2", "--adv-steps", "7",
         "--adv-clean-epochs", "3", "--adv-warmup-epochs", "5", "--adv-center-on", "clean",
         "--models", "b,d"])
    cfg = centers_config(args)
    assert cfg.adv_center_on == "clean"
    assert (cfg.adv_eps, cfg.adv_steps, cfg.adv_clean_epochs, cfg.adv_warmup_epochs) == (
        0.2, 7, 3.0, 5.0)
    assert cfg.models == ("B", "D") and cfg.epochs == 25
    quick = centers_config(build_parser().parse_args(["centers", "--out", str(tmp_path),
                                                      "--quick"]))
    assert quick.epochs < 25 and quick.adv_clean_epochs == 1.0


def _options(parser):
    """Option strings and positional names of a command's parser."""
    names = set(parser._option_string_actions)
    names |= {a.dest for a in parser._actions if not a.option_strings}
    return names


def _expected_options(cls, prefix=""):
    """`--name` for each command-line field of `cls` (nested configs with their prefix)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            own = f.metadata.get("prefix")
            sub = "-".join(p for p in (prefix, f.name if own is None else own) if p)
            yield from _expected_options(hints[f.name], sub)
        elif f.metadata.get("positional"):
            yield f.name
        else:
            yield "--" + "-".join(p for p in (prefix, f.name.replace("_", "-")) if p)


def test_every_config_setting_has_an_option_and_every_command_a_handler():
    from tfadv.cli import build_parser
    from tfadv.config.options import commands

    seen = set()
    for prog, parser in commands(build_parser()):
        assert callable(parser.get_default("func")), prog
        assert parser.get_default("prog") == prog
        for cls in parser.get_default("configs"):
            seen.add(cls.__name__)
            missing = set(_expected_options(cls)) - _options(parser)
            assert not missing, (prog, cls.__name__, missing)
    assert seen == {"MnistTrainConfig", "AttackEvalConfig", "AutoAttackConfig",
                    "EndpointAttackConfig", "MnistDataConfig", "CurveConfig", "CentersStudyConfig",
                    "FaceFinetuneConfig", "SweepConfig", "GenerateConfig", "ExportConfig",
                    "ServeConfig", "QueryConfig", "FaceEvalConfig", "CertifyConfig",
                    "FaceCertifyConfig", "PoisonScanConfig"}


def test_eval_step_size_reaches_the_finetune_evaluation():
    from tfadv.cli import build_parser, finetune_config
    from tfadv.config import FaceEvalConfig

    parse = build_parser().parse_args
    cfg = finetune_config(parse(["facenet", "finetune", "--out", "o", "--eval-step-size", "1.5",
                                 "--eval-attacks", "fgsm,pgd", "--lr", "3e-4", "--no-augment"]))
    assert cfg.evaluation.step_size == 1.5 and cfg.evaluation.attacks == ("fgsm", "pgd")
    assert cfg.evaluation.pgd_steps == FaceEvalConfig().pgd_steps
    assert cfg.learning_rate == 3e-4 and cfg.augment is False
    quick = finetune_config(parse(["facenet", "finetune", "--out", "o", "--quick",
                                   "--eval-step-size", "1.5"]))
    assert quick.evaluation == FaceEvalConfig(**{**vars(FaceEvalConfig.quick()),
                                                 "step_size": 1.5})


def test_documented_command_lines_parse():
    """The spellings of the README, the notebooks and the tests keep working."""
    from tfadv.cli import build_parser, generate_config
    from tfadv.config import AttackEvalConfig, CurveConfig, MnistTrainConfig, SweepConfig
    from tfadv.config.options import build

    parse = build_parser().parse_args
    train = build(MnistTrainConfig, parse(
        "train mnist --method trades --epochs 20 --eps 0.3 --steps 10 --step-size 0.04 "
        "--batch-size 50 --seed 0 --out runs/pgd --data embedded --lr 0.01 --adv-ratio 0.5 "
        "--eps-warmup-epochs 0 --eval-steps 5 --eval-step-size 0.02 --jit-compile "
        "--mixed-precision mixed_bfloat16 --strategy mirrored --limit 300".split()))
    assert (train.learning_rate, train.eval_step_size, train.jit_compile) == (0.01, 0.02, True)
    ev = build(AttackEvalConfig, parse(
        "eval m.keras --attack pgd --attack apgd --eps 0.3 --steps 40 --step-size 0.01 "
        "--restarts 2 --json --check".split()))
    assert ev.attacks == ("pgd", "apgd") and ev.restarts == 2
    from tfadv.config import QueryConfig, ServeConfig

    serve = build(ServeConfig, parse(
        "serve exported/facenet --name facenet --port 8500 --rest-port 8501 --enable-batching "
        "--no-pad-batches --batch-timeout-micros 20000 --monitoring-config-file m.config"
        .split()))
    assert (serve.batching.pad_batches, serve.batching.batch_timeout_micros,
            serve.monitoring_config_file) == (False, 20000, "m.config")
    query = build(QueryConfig, parse(
        "query 127.0.0.1:8500 --name facenet face.jpg --json --encoding jpeg".split()))
    assert (query.encoding, query.images) == ("jpeg", ("face.jpg",))
    curve = build(CurveConfig, parse("curve m.keras --eps 0,0.05,0.1 --out p".split()))
    assert curve.eps == (0.0, 0.05, 0.1)
    sweep = build(SweepConfig, parse(
        "facenet sweep --out runs/sweep --eps 2,4 --steps 1,3 --lr 0.0001".split()))
    assert (sweep.eps, sweep.steps, sweep.lr) == ((2.0, 4.0), (1, 3), (0.0001,))
    assert (sweep.methods, sweep.ensemble) == (("pgd",), 0)
    sweep = build(SweepConfig, parse(
        "facenet sweep --out o --methods pgd,free --ensemble 3 --ensemble-drop 0.02".split()))
    assert (sweep.methods, sweep.ensemble, sweep.ensemble_drop) == (("pgd", "free"), 3, 0.02)
    for bad in (["--methods", "fgsm"], ["--ensemble", "1"], ["--ensemble", "-2"], ["--lr", ""],
                ["--methods", ""]):
        with pytest.raises((ValueError, SystemExit)):
            build(SweepConfig, parse(["facenet", "sweep", "--out", "o", *bad]))
    gen_args = parse(
        "facenet generate --model m --faces f --out o --attacks pgd cleverhans_fgsm --eps 2 4 "
        "--modes dodging --limit 3 --steps 2 --detector none --no-progress --no-random-start "
        "--threshold 0.5".split())
    gen = generate_config(gen_args)
    assert gen_args.model == "m" and gen_args.preset is None
    assert (gen.attacks, gen.eps, gen.modes) == (("pgd", "cleverhans_fgsm"), (2.0, 4.0),
                                                 ("dodging",))
    assert (gen.progress, gen.random_start, gen.threshold) == (False, False, 0.5)
    for line in ["centers --quick --out runs/c --no-uiat --models A",
                 "facenet embed --preset facenet-mscele1m-128 a.jpg b.jpg --json",
                 "facenet finetune --preset facenet-mscele1m-128 --out runs/facenet",
                 "facenet export-pretrained --preset facenet-mscele1m-128 --out runs/p",
                 "export e.keras --out exported/facenet --name facenet --warmup-batch-sizes 1,8",
                 "serve exported/facenet --name facenet --port 8500 --rest-port 8501 --no-rest "
                 "--enable-batching --max-batch-size 8 --no-warmup",
                 "query 127.0.0.1:8500 --name facenet face.jpg --json --no-crop",
                 "assets fetch", "demo --quick"]:
        parse(line.split())
    with pytest.raises(SystemExit):  # --preset and --model exclude each other
        parse("facenet generate --preset p --model m --out o".split())
    with pytest.raises(SystemExit):  # one of them is required
        parse("facenet generate --out o".split())


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, FileExistsError])
def test_one_error_handler_for_every_command(monkeypatch, capsys, error):
    from tfadv import cli

    def fail(args):
        raise error("something the user can fix")

    monkeypatch.setattr(cli, "cmd_facenet_sweep", fail)
    monkeypatch.delenv("TFADV_DEBUG", raising=False)
    assert cli.main(["facenet", "sweep", "--out", "o"]) == 2
    assert capsys.readouterr().err == "tfadv facenet sweep: error: something the user can fix\n"
    monkeypatch.setenv("TFADV_DEBUG", "1")
    with pytest.raises(error):
        cli.main(["facenet", "sweep", "--out", "o"])


def test_serving_commands_share_the_error_handler(capsys, monkeypatch):
    from tfadv.cli import main

    monkeypatch.delenv("TFADV_DEBUG", raising=False)
    assert main(["serve"]) == 2  # the config is checked before anything starts
    assert capsys.readouterr().err.startswith("tfadv serve: error: Pass BASE_DIR")
    assert main(["serve", "b", "--model-config-file", "m"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["export", "/nonexistent/m.keras", "--out", "o"]) == 2
    assert capsys.readouterr().err.startswith("tfadv export: error:")


def test_facenet_generate_command(tmp_path, capsys, monkeypatch):
    """`tfadv facenet generate` end to end on a tiny embedder: options reach the generator,
    threshold.json next to --model is used, errors a user can fix are exit code 2."""
    import numpy as np
    from PIL import Image

    from tests.conftest import tiny_embedder
    from tfadv.cli import main
    from tfadv.data import adversarial_records as R
    from tfadv.evaluation.verification import save_threshold

    monkeypatch.delenv("TFADV_DEBUG", raising=False)
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces"
    for person in ("ann", "bob"):
        (faces / person).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                faces / person / f"{k}.png")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_embedder(16).save(model_dir / "embedder.keras")
    save_threshold(model_dir, 0.77)
    out = tmp_path / "adv"
    argv = ["facenet", "generate", "--model", str(model_dir), "--faces", str(faces),
            "--out", str(out), "--attacks", "pgd", "fgsm", "--eps", "2,4", "--modes",
            "dodging", "--limit", "3", "--steps", "2", "--detector", "none", "--no-progress"]
    assert main(argv) == 0
    meta = R.load_metadata(out)
    assert meta["count"] == 2 * 2 * 3 and meta["threshold"] == pytest.approx(0.77)
    assert meta["threshold_source"].endswith("threshold.json")
    assert "pgd" in capsys.readouterr().out
    assert main(argv) == 2  # the output exists
    err = capsys.readouterr().err
    assert err.startswith("tfadv facenet generate: error:") and "overwrite" in err
    assert main([*argv, "--overwrite", "--faces", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("tfadv facenet generate: error:")


@pytest.mark.parametrize("norm, eps, steps, given, want", [
    ("inf", 0.3, 40, None, 2.5 * 0.3 / 40), ("2", 2.0, 20, None, 2.5 * 2.0 / 20),
    ("2", 2.0, 20, 0.05, 0.05)])
def test_eval_pgd_step_scales_with_the_budget_unless_given(norm, eps, steps, given, want):
    """A fixed 0.01 default left L2 PGD at eps 2 with 1/25 of its usual step (robust
    accuracy 0.67 where a scaled step gave 0.41)."""
    from tfadv.cli import make_attacks
    from tfadv.config.mnist import AttackEvalConfig

    (pgd,) = make_attacks(AttackEvalConfig(eps=eps, steps=steps, norm=norm, step_size=given))
    assert pgd.step_size == pytest.approx(want) and pgd.norm == norm
