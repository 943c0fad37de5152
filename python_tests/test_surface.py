"""The package's surface is real (issue 25, items 3 and 4): every ``__all__`` name exists, the old
import paths warn, checkpoints written before the unused RNG streams were dropped resume, and
metrics.jsonl, numbers and the CPU's name each have one reader or formatter."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

import varweight_kernels
from varweight_kernels.training.checkpoint import load_checkpoint, save_checkpoint
from varweight_kernels.training.loop import train
from varweight_kernels.training.rng import STREAMS, derive_seed
from varweight_kernels.training.run_dir import latest_checkpoint
from tiny_runs import assert_runs_equal, one_thread, subprocess_env, tiny  # noqa: F401

DEPRECATED = {"varweight_kernels.triton_vaw": "varweight_kernels.backends.triton",
              "varweight_kernels.cpp_backend": "varweight_kernels.backends.compiled",
              "varweight_kernels.training.trainer": None}


def _modules():
    """Every Python module of the package (not the built op libraries, which have no __all__)."""
    for info in pkgutil.walk_packages(varweight_kernels.__path__, "varweight_kernels."):
        origin = importlib.util.find_spec(info.name).origin or ""
        if info.name not in DEPRECATED and not info.name.endswith("__main__") and origin.endswith(".py"):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_exported_name_exists(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional dependency (triton, tensorboard, ...) is missing here
        pytest.skip(f"{name} cannot be imported here: {exc}")
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists missing names {missing} (import * raises)"


def test_star_import_of_run_dir():
    namespace: dict = {}
    exec("from varweight_kernels.training.run_dir import *", namespace)
    assert "MetricsLog" in namespace


@pytest.mark.parametrize("old", sorted(DEPRECATED))
def test_old_import_paths_warn_and_still_work(old):
    new = DEPRECATED[old]
    check = f"assert mod is importlib.import_module({new!r})" if new else "assert callable(mod.train)"
    code = ("import importlib, warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            f"    mod = importlib.import_module({old!r})\n"
            f"{check}\n"
            "hits = [w for w in seen if issubclass(w.category, DeprecationWarning) and 'deprecated' in str(w.message)]\n"
            "assert len(hits) == 1, [str(w.message) for w in seen]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_checkpoint_with_the_dropped_streams_resumes(tmp_path):
    """Checkpoints before issue 25 also held the never-drawn "init" and "sample" generators."""
    assert not {"init", "sample"} & set(STREAMS)
    kw = dict(weighting="vaw", noise_sampling="vaw-is", is_warmup=0)
    train(tiny(tmp_path / "full", steps=6, **kw))
    cfg = tiny(tmp_path / "split", steps=3, **kw)
    train(cfg)
    path = latest_checkpoint(str(tmp_path / "split"))
    state = load_checkpoint(path)
    for rank, entry in enumerate(state["ranks"]):
        for name in ("init", "sample"):
            entry["rng"][name] = torch.Generator().manual_seed(derive_seed(cfg.seed, name, rank)).get_state()
    save_checkpoint(state, path)
    train(tiny(tmp_path / "split", steps=6, resume=True, **kw))
    assert_runs_equal(tmp_path / "full", tmp_path / "split", 6)


# -- one reader, one formatter (issue 25, item 4) ----------------------------------------------
def test_metrics_readers_agree_on_bad_lines(tmp_path):
    """metrics.jsonl had three readers that disagreed on a bad line; run_dir.read_metrics is the
    one: a line cut by a crash is skipped, a JSON line that is not a record names file and line."""
    from varweight_kernels.training.config import TrainError
    from varweight_kernels.training.run_dir import MetricsLog, read_metrics
    from varweight_kernels.training.run_index import latest_metrics, render_run_index

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 0.5}\n\n{"step": 4, "loss": 0.25}\n{"step": 6, "lo')
    assert read_metrics(str(path)) == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    assert latest_metrics(str(path)) == {"loss": (0.25, 4)}
    assert read_metrics(str(tmp_path / "none.jsonl")) == []
    path.write_text('{"step": 2, "loss": 0.5}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        read_metrics(str(path))
    with pytest.raises(ValueError, match="line 2"):
        latest_metrics(str(path))
    assert "Not readable" in render_run_index(str(tmp_path))  # the index says so and is still written
    with pytest.raises(TrainError, match="line 2 is not a metrics record.*remove the line to resume"):
        MetricsLog(str(tmp_path), enabled=True).truncate_to(2, 2)


def test_format_number():
    from varweight_kernels.training.run_dir import format_number

    assert format_number(0.123456) == "0.1235" and format_number(3, digits=2) == "3"
    assert [format_number(v) for v in (None, float("nan"), float("inf"), "text")] == ["n/a"] * 4
    assert format_number(float("nan"), missing="-") == "-"
    assert format_number(12.345, 1, fixed=True) == "12.3" and format_number(12345.6, 1, fixed=True) == "12,346"


def test_cpu_name_reads_proc_cpuinfo():
    from varweight_kernels.backends import cpu_name

    name = cpu_name()
    assert name and "\n" not in name
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            assert any(line.startswith("model name") and line.split(":", 1)[1].strip() == name for line in fh)
