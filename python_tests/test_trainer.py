"""Trainer end to end on CPU: sklearn digits (8x8), a tiny U-Net, a few steps.

Covers: every weighting trains with finite loss; stop + --resume == unbroken (parameters,
optimizer/weighting/observer/RNG state, metrics and binstats, bitwise); 2-rank gloo run via
torch.distributed.run (ranks agree on parameters and VAW state, data differs per rank, resume
works); bad CLI input (non-zero exit, one-line reason, no traceback); paired seeds (same init,
batches, levels and noise whatever the weighting); --sample-only.
"""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.cli import main, parse_config
from varweight_kernels.training.config import build_parser, PRESETS
from varweight_kernels.training.loop import Callbacks, train
from tiny_runs import (ROOT, TINY, TINY_FLAGS, assert_runs_equal, one_thread, read_metrics,  # noqa: F401
                       subprocess_env, tiny)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting,extra", [
    ("uniform", {}), ("vaw", {}), ("seed-cauchy", {}), ("seed-standardized", {}), ("min-snr", {}), ("p2", {}),
    ("edm2", {}), ("vaw", {"formulation": "ddpm"}), ("vaw", {"noise_sampling": "vaw-is", "is_warmup": 0}),
    ("p2", {"formulation": "ddpm", "noise_sampling": "vaw-is", "is_warmup": 0}),
])
def test_every_weighting_trains(tmp_path, weighting, extra):
    out = tmp_path / "run"
    res = train(tiny(out, weighting=weighting, steps=3, **extra))
    assert res["status"] == "done" and res["step"] == 3
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [2, 3]
    for r in recs:
        assert np.isfinite(r["loss"]) and np.isfinite(r["weighted_loss"]) and np.isfinite(r["grad_norm"])
        assert r["skipped_steps"] == 0 and r["nonfinite"] == 0
    for name in ("config.json", "DONE", "binstats.npz", "samples_step00000003.png"):
        assert (out / name).exists(), name
    with np.load(out / "binstats.npz") as z:
        assert list(z["steps"]) == [2, 3] and z["mean"].shape == (2, 8) and z["bin_edges"].shape == (9,)
        assert ("weight" in z.files) == (weighting == "vaw")
        assert z["count"][-1].sum() == 3 * 16  # the observer saw every (unweighted) sample
    state = load_checkpoint(res["checkpoint"])
    assert state["step"] == 3 and state["config"]["weighting"] == weighting
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_stop_resume_is_bitwise_identical(tmp_path):
    kw = dict(weighting="vaw", flip=True, dropout=0.1, noise_sampling="vaw-is", is_warmup=0)
    train(tiny(tmp_path / "full", steps=8, **kw))
    # stop at 5 (off the log and checkpoint cadence), resume with a changed --steps, and a
    # --log-every / --quiet that may differ
    train(tiny(tmp_path / "split", steps=5, **kw))
    assert main(["--out", str(tmp_path / "split"), "--resume", "--steps", "8", "--quiet"]) == 0
    assert_runs_equal(tmp_path / "full", tmp_path / "split", 8)
    assert (tmp_path / "split" / "DONE").exists()
    # a finished run resumes as a no-op
    assert main(["--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    # --sample-only from the EMA weights
    assert main(["--out", str(tmp_path / "split"), "--sample-only", "--num-samples", "5", "--quiet"]) == 0
    with np.load(tmp_path / "split" / "samples.npz") as z:
        assert z["images"].shape == (5, 8, 8, 1) and z["images"].dtype == np.uint8
    assert (tmp_path / "split" / "samples.png").stat().st_size > 0


def test_edm2_resume_is_bitwise_identical(tmp_path):
    train(tiny(tmp_path / "full", steps=6, weighting="edm2"))
    train(tiny(tmp_path / "split", steps=4, weighting="edm2"))
    train(tiny(tmp_path / "split", steps=6, weighting="edm2", resume=True))
    assert_runs_equal(tmp_path / "full", tmp_path / "split", 6)


def test_resume_refuses_incompatible_config(tmp_path, capsys):
    train(tiny(tmp_path / "run", steps=3, weighting="vaw"))
    capsys.readouterr()
    rc = main(["--out", str(tmp_path / "run"), "--resume", "--lr", "0.5", "--weighting", "uniform", "--steps", "9"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert "lr" in err and "weighting" in err and "steps" not in err.split("differs", 1)[1]


# ---------------------------------------------------------------------------------------------
def test_paired_seeds_share_init_data_levels_and_noise(tmp_path):
    class Record(Callbacks):
        def __init__(self):
            self.seen = []

        def on_batch(self, step, b):
            entry = {"x0": _digest(b["x0"]), "noise": _digest(b["noise"]), "level": _digest(b["level"])}
            if step == 0:
                entry["init"] = _digest(torch.cat([p.detach().flatten() for p in b["model"].parameters()]))
            self.seen.append(entry)

    def record(name, **kw):
        recorder = Record()
        train(tiny(tmp_path / name, steps=3, flip=True, **kw), recorder)
        return recorder.seen

    ref = record("uniform", weighting="uniform")
    assert record("vaw", weighting="vaw") == ref
    assert record("edm2", weighting="edm2") == ref
    assert record("cauchy", weighting="seed-cauchy") == ref
    # vaw-is draws the levels differently (by design) but nothing else moves
    is_run = record("vawis", weighting="uniform", noise_sampling="vaw-is", is_warmup=0)
    assert [(e["x0"], e["noise"]) for e in is_run] == [(e["x0"], e["noise"]) for e in ref]
    assert is_run[0]["init"] == ref[0]["init"] and is_run[0]["level"] == ref[0]["level"]
    assert is_run[2]["level"] != ref[2]["level"]
    # another seed changes everything
    other = record("seed1", weighting="uniform", seed=1)
    assert other[0]["init"] != ref[0]["init"] and other[0]["x0"] != ref[0]["x0"]
    assert other[0]["noise"] != ref[0]["noise"]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
WORKER = """
import json, os, sys, hashlib, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from varweight_kernels.training.config import TrainConfig
from varweight_kernels.training.loop import Callbacks, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
# phase 1: stop after 3 steps; phase 2 (same processes, same process group): --resume to cfg.steps
train(cfg.replace({{"steps": 3}}))
cfg = cfg.replace({{"resume": True}})
rank = int(os.environ["RANK"])
first = {{}}
class Save(Callbacks):
    def on_batch(self, step, b):
        if step == cfg.steps - 1:
            first["x0"] = hashlib.sha256(b["x0"].numpy().tobytes()).hexdigest()
            first["noise"] = hashlib.sha256(b["noise"].numpy().tobytes()).hexdigest()
    def on_end(self, objs):
        torch.save({{"model": objs["model"].state_dict(), "ema": objs["ema"].state_dict(),
                    "vaw": objs["weighting"].vaw.state_dict(), "observer": objs["observer"].state_dict(),
                    "batch": first}}, os.path.join(cfg.out, f"rank{{rank}}.pt"))
train(cfg, Save())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, cfg: dict, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(script), json.dumps(cfg)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_two_rank_gloo_run_agrees_and_resumes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(root=str(ROOT))))
    cfg = {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
           "out": str(tmp_path / "ddp"), "weighting": "vaw", "steps": 5}
    r = _torchrun(script, cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    for part in ("model", "ema", "vaw", "observer"):
        for k, v in s0[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, s1[part][k]), f"{part}.{k} differs between ranks"
    assert s0["vaw"]["step"].item() == 5 and s0["observer"]["C"].sum().item() == 5 * 16  # synced global counts
    assert s0["batch"]["x0"] != s1["batch"]["x0"] and s0["batch"]["noise"] != s1["batch"]["noise"]
    state = load_checkpoint(str(tmp_path / "ddp" / "checkpoints" / "ckpt_00000005.pt"))
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert torch.equal(state["model"]["conv_out.weight"], s0["model"]["conv_out.weight"])
    assert [r["step"] for r in read_metrics(tmp_path / "ddp")] == [2, 4, 5]


# ---------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv, monkeypatch=None):
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc != 0, argv
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_cli_input_fails_with_one_line(tmp_path, capsys, monkeypatch):
    base = ["--out", str(tmp_path / "x")] + TINY_FLAGS
    assert "unknown dataset" in _one_line_error(capsys, base + ["--dataset", "mnist"])
    assert "unknown weighting" in _one_line_error(capsys, base + ["--weighting", "nope"])
    assert "unknown preset" in _one_line_error(capsys, base + ["--preset", "nope"])
    assert "unknown noise-sampling" in _one_line_error(capsys, base + ["--noise-sampling", "x"])
    err = _one_line_error(capsys, base + ["--dataset", "cifar10", "--data-root", str(tmp_path / "empty")])
    assert "cifar10" in err and "--download" in err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "not divisible" in _one_line_error(capsys, base)
    monkeypatch.delenv("WORLD_SIZE")
    # an existing run is never overwritten without --resume / --overwrite
    train(tiny(tmp_path / "x", steps=1))
    capsys.readouterr()
    before = (tmp_path / "x" / "metrics.jsonl").read_text()
    err = _one_line_error(capsys, base + ["--steps", "2"])
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "x" / "metrics.jsonl").read_text() == before
    assert main(base + ["--steps", "2", "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "x")] == [2]
    assert "no run" in _one_line_error(capsys, ["--out", str(tmp_path / "none"), "--resume"])


def test_cli_subprocess_help_and_error():
    help_out = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--help"], capture_output=True,
                              text=True, env=subprocess_env(), timeout=120)
    assert help_out.returncode == 0
    text = " ".join(help_out.stdout.split())
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.option_strings[0] in text, action.option_strings[0]
    assert text.count("(default:") == len(build_parser()._actions) - 1
    for flag in ("--vaw-logsnr-range", "--max-nonfinite", "--fid-weights", "--noise-sampling", "--channel-mults"):
        assert flag in text
    bad = subprocess.run([sys.executable, str(ROOT / "train_cifar.py"), "--dataset", "nope", "--out", "/nonexistent/x"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "unknown dataset" in bad.stderr


def test_config_precedence_and_presets():
    cfg = parse_config(["--preset", "digits-smoke", "--channels", "24"])
    assert cfg.channels == 24 and cfg.dataset == "digits" and cfg.steps == PRESETS["digits-smoke"]["steps"]
    assert cfg.lr == PRESETS["digits-smoke"]["lr"]
    default = parse_config([])
    assert (default.channels, default.channel_mults, default.attn_resolutions) == (128, (1, 2, 4), (16, 8))
    assert (default.batch_size, default.lr, default.weight_decay, default.grad_clip) == (128, 2e-4, 0.0, 1.0)
    assert (default.ema_decay, default.steps, default.sigma_data, default.sample_steps, default.rho) == \
        (0.9995, 60000, 0.5, 50, 7.0)
    for name in PRESETS:
        parse_config(["--preset", name]).validate()
    cfg = parse_config(["--vaw-logsnr-range", "-10", "8", "--attn-resolutions", "--no-flip"])
    assert cfg.vaw_logsnr_range == (-10.0, 8.0) and cfg.attn_resolutions == () and cfg.flip is False


def test_old_trainer_module_re_exports():
    from varweight_kernels.training import builders, cli, config, loop, run_dir, sampling, trainer
    assert (trainer.train, trainer.main, trainer.parse_config, trainer.sample_only) == \
        (loop.train, cli.main, cli.parse_config, sampling.sample_only)
    assert (trainer.TrainError, trainer.TIMING_FIELDS, trainer.EMA, trainer.build_model) == \
        (config.TrainError, run_dir.TIMING_FIELDS, builders.EMA, builders.build_model)


def test_final_persample_analysis_is_written(tmp_path):
    """The paper's variance analysis: per-sample (lam, loss) of the EMA model, from its own stream."""
    train(tiny(tmp_path / "a", steps=2, analysis_batches=3))
    train(tiny(tmp_path / "b", steps=2, analysis_batches=3, weighting="vaw"))
    a = np.load(tmp_path / "a" / "persample.npz")
    b = np.load(tmp_path / "b" / "persample.npz")
    assert a["lam"].shape == a["loss"].shape == (3 * TINY["batch_size"],)
    assert np.isfinite(a["loss"]).all() and (a["loss"] >= 0).all()
    np.testing.assert_array_equal(a["lam"], b["lam"])  # same seed: same analysis noise levels
    # the raw (non-EMA) model and the weighted losses too (issue 15); uniform weighs everything 1
    assert set(a.files) == {"lam", "loss", "weighted_loss", "raw_loss", "raw_weighted_loss"}
    np.testing.assert_array_equal(a["weighted_loss"], a["loss"])
    np.testing.assert_array_equal(a["raw_weighted_loss"], a["raw_loss"])
    assert not np.array_equal(a["raw_loss"], a["loss"])  # EMA decay 0.9: the models differ
    assert np.isfinite(b["raw_weighted_loss"]).all() and b["raw_weighted_loss"].shape == b["lam"].shape
    train(tiny(tmp_path / "c", steps=2, analysis_batches=0))
    assert not (tmp_path / "c" / "persample.npz").exists()


# ---------------------------------------------------------------------------------------------
# issue 15: the seed presets are the paper's code
def test_print_config_shows_the_paper_code_in_the_seed_presets(capsys):
    def printed(*argv) -> dict:
        assert main(list(argv) + ["--print-config"]) == 0
        return json.loads(capsys.readouterr().out)

    for dataset in ("cifar10", "cifar100"):
        paper = printed("--preset", f"seed-{dataset}")
        assert (paper["arch"], paper["amp"], paper["drop_last"], paper["dataset"]) == ("paper", "fp32", False, dataset)
        assert paper["alpha"] == -1.0  # seed-cauchy's default 0.05
        fast = printed("--preset", f"fast-{dataset}")
        assert (fast["arch"], fast["amp"], fast["drop_last"], fast["dataset"]) == ("ddpm", "auto", True, dataset)
    assert printed("--preset", "seed-cifar10", "--alpha", "0.01", "--drop-last")["drop_last"] is True
    assert "needs --formulation edm" in _one_line_error(capsys, ["--arch", "paper", "--formulation", "ddpm",
                                                                 "--print-config"])


def test_paper_network_trains_two_steps_on_digits(tmp_path):
    """The paper's U-Net (its narrowest width, 32) on 8x8 digits, as the seed presets set it up."""
    res = train(tiny(tmp_path / "paper", arch="paper", channels=32, amp="fp32", drop_last=False, steps=2,
                     weighting="seed-cauchy", analysis_batches=1))
    assert res["status"] == "done" and res["step"] == 2
    state = load_checkpoint(str(tmp_path / "paper" / "checkpoints" / "ckpt_00000002.pt"))
    assert "fourier.freqs" in state["model"] and "res_6_2.conv_2.weight" in state["model"]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "paper"))


def test_short_last_batch_is_kept_without_drop_last(tmp_path):
    """1797 digits in batches of 600: two full batches and one of 597, then the next epoch."""
    kw = dict(batch_size=600, steps=4, log_every=1, ckpt_every=4)
    train(tiny(tmp_path / "keep", drop_last=False, **kw))
    train(tiny(tmp_path / "drop", **kw))
    with np.load(tmp_path / "keep" / "binstats.npz") as z:
        assert z["count"].sum(axis=1).tolist() == [600, 1200, 1797, 2397]
    assert [r["epoch"] for r in read_metrics(tmp_path / "keep")] == [0, 0, 0, 1]
    assert [r["epoch"] for r in read_metrics(tmp_path / "drop")] == [0, 0, 1, 1]
