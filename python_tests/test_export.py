"""Weights users can open (``--export``, ``load_pretrained``), upscaled sample grids and the run's
``index.md``, on one tiny digits run.

Done when an exported file loads into a fresh network with ``strict=True`` and gives bitwise the
samples ``--sample-only`` writes for the same seed.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.cli import main
from varweight_kernels.training.export import WeightsError, generate_pretrained, load_pretrained, sidecar_path
from varweight_kernels.training.loop import train
from varweight_kernels.training.sampling import grid_scale, save_grid
from varweight_kernels.training.unet import build_unet
from tiny_runs import one_thread, tiny  # noqa: F401


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run with --sample-only samples and both exports."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export") / "run"
    try:
        train(tiny(out, steps=4, analysis_batches=1, num_samples=6))
        assert main(["--out", str(out), "--sample-only", "--quiet"]) == 0
        assert main(["--out", str(out), "--export", str(out / "ema.safetensors"), "--quiet"]) == 0
        assert main(["--out", str(out), "--export", str(out / "raw.pt"), "--export-weights", "raw", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_export_loads_strictly_and_samples_like_sample_only(run):
    net, meta = load_pretrained(run / "ema.safetensors")
    assert not net.training and meta["which"] == "ema" and meta["step"] == 4
    fresh = build_unet(meta["arch"], meta["in_channels"], meta["image_size"], **meta["network"])
    from safetensors.torch import load_file  # a plain safetensors reader opens it
    fresh.load_state_dict(load_file(str(run / "ema.safetensors")), strict=True)
    with np.load(run / "samples.npz") as z:
        expected = z["images"]
    for model in (net, fresh):
        images = generate_pretrained(model, meta, len(expected))
        assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), expected)


def test_exports_hold_the_checkpoint_weights(run):
    state = load_checkpoint(str(run / "checkpoints" / "ckpt_00000004.pt"))
    for name, key in (("ema.safetensors", "ema"), ("raw.pt", "model")):
        net, meta = load_pretrained(run / name)
        assert meta["which"] == ("ema" if key == "ema" else "raw")
        got = net.state_dict()
        assert set(got) == set(state[key]) and all(torch.equal(got[k], state[key][k]) for k in got)
    plain = torch.load(run / "raw.pt", weights_only=True)
    assert isinstance(plain, dict) and all(isinstance(v, torch.Tensor) for v in plain.values())


def test_load_pretrained_leaves_the_global_rng_alone(run):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_pretrained(run / "raw.pt")
    assert torch.equal(torch.rand(3), expected)


def _copy_export(run, tmp_path, name="ema.safetensors"):
    dst = tmp_path / name
    shutil.copy(run / name, dst)
    shutil.copy(sidecar_path(str(run / name)), sidecar_path(str(dst)))
    return dst


def _edit_sidecar(path, **changes):
    side = sidecar_path(str(path))
    with open(side) as fh:
        meta = json.load(fh)
    meta.update(changes)
    with open(side, "w") as fh:
        json.dump(meta, fh)


@pytest.mark.parametrize("damage,message", [
    ("no sidecar", "has no sidecar"),
    ("other format", "not a varweight weights sidecar"),
    ("other version", "version 2"),
    ("flipped byte", "does not match its sidecar"),
    ("wider network", "does not fit the network of its sidecar"),
])
def test_load_pretrained_refuses_in_one_line(run, tmp_path, damage, message):
    path = _copy_export(run, tmp_path)
    if damage == "no sidecar":
        (tmp_path / "ema.safetensors.json").unlink()
    elif damage == "other format":
        _edit_sidecar(path, format="varweight-checkpoint")
    elif damage == "other version":
        _edit_sidecar(path, version=2)
    elif damage == "flipped byte":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    else:
        meta = json.loads((tmp_path / "ema.safetensors.json").read_text())
        _edit_sidecar(path, network=dict(meta["network"], base_channels=2 * meta["network"]["base_channels"]))
    with pytest.raises(WeightsError, match=message) as err:
        load_pretrained(path)
    assert "\n" not in str(err.value)


def test_export_cli_errors_are_one_line(run, tmp_path, capsys):
    assert main(["--out", str(run), "--export", str(tmp_path / "weights.bin")]) == 1
    assert main(["--out", str(tmp_path / "no-run"), "--export", str(tmp_path / "w.pt")]) == 1
    assert main(["--out", str(run), "--export", str(tmp_path / "w.pt"), "--export-weights", "best"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert ".safetensors" in err[0] and "no checkpoint" in err[1] and "export-weights" in err[2]
    assert not (tmp_path / "w.pt").exists()


def test_grids_upscale_small_samples(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    assert (grid_scale(8, 8), grid_scale(32, 32), grid_scale(28, 28), grid_scale(64, 64), grid_scale(256, 256)) \
        == (8, 2, 3, 1, 1)
    images = torch.arange(4 * 8 * 8, dtype=torch.uint8).reshape(4, 1, 8, 8)
    save_grid(images, str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 65 + 1, 2 * 65 + 1)
    first = grid[1:65, 1:65]
    assert np.array_equal(first, images[0, 0].numpy().repeat(8, 0).repeat(8, 1))  # nearest neighbour


def test_run_index_links_what_the_run_holds(run):
    index = (run / "index.md").read_text()
    for link in ("(<config.json>)", "(<metrics.jsonl>)", "(<samples.png>)", "(<samples_step00000004.png>)",
                 "(<binstats.npz>)", "(<persample.npz>)", "(<samples.npz>)", "(<checkpoints/ckpt_00000004.pt>)",
                 "(<ema.safetensors>)", "(<raw.pt>)", "(<raw.pt.json>)"):
        assert link in index, link
    assert "Finished (step 4)" in index and "| weighting | uniform |" in index
    assert "| loss |" in index and "Experiment report" not in index


def test_the_experiment_report_is_linked_from_its_runs_index(run, tmp_path):
    from varweight_kernels.experiments.report import build_report
    exp = tmp_path / "exp"
    seed_dir = exp / "runs" / "uniform" / "seed0"
    shutil.copytree(run, seed_dir)
    build_report(str(exp))
    index = (seed_dir / "index.md").read_text()
    figures = sorted((exp / "report").glob("*.png"))
    assert "(<../../../report.md>)" in index and figures
    for figure in figures:
        assert f"![{figure.name}](<../../../report/{figure.name}>)" in index
