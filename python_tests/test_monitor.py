"""``LogSNRMonitor``: per-bin loss statistics on the package's kernels, its TensorBoard helper, the
view over a VAW that computes nothing twice, DDP, and the trainer's observer built on it."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import varweight_kernels.ops as ops
from varweight_kernels import LogSNRMonitor, VarianceAwareWeighting
from varweight_kernels.training.checkpoint import load_checkpoint
from varweight_kernels.training.loop import train
from tiny_runs import one_thread, tiny  # noqa: F401

EDGES = (-4.0, 4.0)


def batch(seed, size=64):
    g = torch.Generator().manual_seed(seed)
    lam = 3 * torch.randn(size, generator=g, dtype=torch.float64)
    loss = torch.exp(-lam / 4) * (1 + 0.3 * torch.randn(size, generator=g, dtype=torch.float64))
    return loss.float(), lam.float()


def expected_stats(batches, num_bins, decay):
    """VAW's per-bin EMA by hand (numpy): a bin with n samples moves by 1 - decay**n, bias-corrected."""
    lo, hi = EDGES
    M, Q, Z, C = (np.zeros(num_bins) for _ in range(4))
    for loss, lam in batches:
        loss, lam = loss.double().numpy(), lam.numpy()
        idx = np.clip(np.floor((lam - lo) * np.float32(num_bins / (hi - lo))), 0, num_bins - 1).astype(int)
        for k in range(num_bins):
            x = loss[idx == k]
            if len(x):
                a = decay ** len(x)
                M[k] = a * M[k] + (1 - a) * x.mean()
                Q[k] = a * Q[k] + (1 - a) * (x * x).mean()
                Z[k] = a * Z[k] + (1 - a)
                C[k] += len(x)
    mean = np.where(Z > 0, M / np.where(Z > 0, Z, 1), 0)
    var = np.where(Z > 0, Q / np.where(Z > 0, Z, 1) - mean ** 2, 0)
    return mean, var, C


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_statistics_are_the_per_bin_ema(backend):
    monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES, decay=0.9, backend=backend)
    batches = [batch(s) for s in range(4)]
    for loss, lam in batches:
        assert monitor(loss, lam) is None
    st = monitor.stats()
    mean, var, count = expected_stats(batches, 8, 0.9)
    np.testing.assert_allclose(st["mean"].numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(st["var"].numpy(), var, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(st["count"].numpy(), count)
    assert int(st["step"]) == 4 and int(st["nonfinite"]) == 0 and "weight" not in st
    assert torch.equal(monitor.vaw.weight, torch.ones(8))  # the statistics-only step weights nothing


def test_nonfinite_eval_and_gradient():
    monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES)
    loss, lam = batch(0)
    loss[:3] = float("nan")
    lam[3] = float("nan")
    monitor(loss.requires_grad_(), lam)  # a loss that needs grad is read, not differentiated
    assert int(monitor.stats()["nonfinite"]) == 4 and monitor.stats()["count"].sum() == 60
    before = {k: v.clone() for k, v in monitor.state_dict().items() if isinstance(v, torch.Tensor)}
    monitor.eval()
    monitor(*batch(1))
    assert all(torch.equal(v, monitor.state_dict()[k]) for k, v in before.items())
    monitor.train()
    with torch.no_grad():  # as for VAW: no_grad in train mode still updates (USING.md says so)
        monitor(*batch(1))
    assert int(monitor.stats()["step"]) == 2


def test_bad_input_is_one_line():
    monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES)
    with pytest.raises(ValueError, match="1-D of the same length"):
        monitor(torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(TypeError, match="must be tensors"):
        monitor([1.0], torch.ones(1))
    with pytest.raises(TypeError, match="takes a VarianceAwareWeighting"):
        LogSNRMonitor.of(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="history must be an integer >= 2"):
        LogSNRMonitor(history=1)
    with pytest.raises(ValueError, match="num_bins"):
        LogSNRMonitor(num_bins=0)


def test_view_reads_vaw_and_computes_nothing():
    vaw = VarianceAwareWeighting(num_bins=8, logsnr_range=EDGES, min_count=4)
    view = LogSNRMonitor.of(vaw)
    for s in range(3):
        vaw(*batch(s))
    st, direct = view.stats(), vaw.stats()
    assert set(st) == set(direct) and all(torch.equal(st[k], direct[k]) for k in st)
    with pytest.raises(RuntimeError, match="do not call the monitor"):
        view(*batch(0))
    assert list(view.state_dict()) == [] and list(view.buffers()) == []  # the VAW is its owner's to save
    view.eval()
    assert vaw.training  # and to switch


def test_stepping_a_vaw_equals_calling_it():
    """``of(vaw, update=True)``: the statistics plus the table VAW would weight with."""
    observed = LogSNRMonitor.of(VarianceAwareWeighting(num_bins=8, logsnr_range=EDGES, min_count=4), update=True)
    direct = VarianceAwareWeighting(num_bins=8, logsnr_range=EDGES, min_count=4)
    for s in range(3):
        observed(*batch(s))
        direct(*batch(s))
    st = observed.stats()
    assert "weight" in st and not torch.equal(st["weight"], torch.ones(8))
    assert all(torch.equal(st[k], v) for k, v in direct.stats().items())
    assert set(observed.state_dict()) == {"vaw." + k for k in direct.state_dict()}


def test_state_round_trips():
    monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES)
    for s in range(3):
        monitor(*batch(s))
    restored = LogSNRMonitor(num_bins=8, logsnr_range=EDGES)
    restored.load_state_dict(monitor.state_dict())
    assert all(torch.equal(v, restored.stats()[k]) for k, v in monitor.stats().items())
    with pytest.raises(RuntimeError, match="num_bins=8, this module has num_bins=16"):
        LogSNRMonitor(num_bins=16, logsnr_range=EDGES).load_state_dict(monitor.state_dict())


class FakeWriter:
    def __init__(self):
        self.histograms, self.scalars, self.images = {}, {}, {}

    def add_histogram_raw(self, tag, **kw):
        self.histograms[tag] = kw

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, image, step, dataformats):
        self.images[tag] = (image, step, dataformats)


def test_tensorboard_logs_bins_and_heatmap():
    monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES)
    writer = FakeWriter()
    for s in range(3):
        monitor(*batch(s))
        monitor.log_tensorboard(writer, s)
    st = monitor.stats()
    assert set(writer.histograms) == {"logsnr/mean", "logsnr/var", "logsnr/count"}
    for name in ("mean", "var", "count"):
        logged = writer.histograms[f"logsnr/{name}"]
        assert logged["bucket_counts"] == st[name].tolist() and logged["global_step"] == 2
        assert logged["bucket_limits"] == st["bin_edges"][1:].tolist()
    assert writer.scalars["logsnr/nonfinite"] == (0, 2)
    image, step, fmt = writer.images["logsnr/loss_heatmap"]
    assert fmt == "HWC" and step == 2 and image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[0] % 3 == 0 and image.shape[1] % 8 == 0  # 3 snapshots x 8 bins, cells enlarged


def test_heatmap_colours_and_history():
    monitor = LogSNRMonitor(num_bins=4, logsnr_range=EDGES, history=4)
    monitor(torch.tensor([100.0, 1.0]), torch.tensor([-3.5, 3.5]))  # bins 0 and 3 seen, 1 and 2 empty
    for step in range(4):
        monitor.snapshot(step)
    assert monitor.history_steps() == [0, 1, 2, 3]
    for step in range(4, 10):
        monitor.snapshot(step)
    assert monitor.history_steps() == [0, 4, 8, 9]  # evenly thinned (twice), and the newest
    for step in range(10, 13):
        monitor.snapshot(step)
    assert monitor.history_steps() == [0, 4, 8, 12]
    image = monitor.heatmap(cell=(1, 1))
    assert image.shape == (4, 4, 3)
    assert (image[:, 1] == 128).all() and (image[:, 2] == 128).all()  # empty bins are grey
    assert image[0, 0].sum() > image[0, 3].sum()  # the high loss is the bright end of viridis
    with pytest.raises(RuntimeError, match="no history yet"):
        LogSNRMonitor(num_bins=4).heatmap()


def test_real_summary_writer(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is in the [train] extra")
    monitor = LogSNRMonitor.of(VarianceAwareWeighting(num_bins=8, logsnr_range=EDGES), update=True)
    monitor(*batch(0))
    with tensorboard.SummaryWriter(log_dir=str(tmp_path)) as writer:
        monitor.log_tensorboard(writer, 1)
    assert [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents.")]


# -- DDP ------------------------------------------------------------------------------------------
STEPS = 3


def _worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    real = ops.sync_moments
    ops.sync_moments = lambda moments: (calls.append(1), real(moments))[1]
    try:
        monitor = LogSNRMonitor(num_bins=8, logsnr_range=EDGES, backend="reference")
        vaw = VarianceAwareWeighting(num_bins=8, logsnr_range=EDGES, backend="reference")
        view = LogSNRMonitor.of(vaw)
        for s in range(STEPS):
            loss, lam = batch(100 * rank + s)
            monitor(loss, lam)
            vaw(loss, lam)
        torch.save({"monitor": monitor.stats(), "view": view.stats(), "calls": len(calls)},
                   os.path.join(result_dir, f"{rank}.pt"))
    finally:
        ops.sync_moments = real
        dist.destroy_process_group()


def test_two_ranks_sum_statistics_and_the_view_adds_no_all_reduce(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["calls"] == r1["calls"] == 2 * STEPS  # the monitor's and VAW's; none for the view
    for key in ("monitor", "view"):
        assert all(torch.equal(v, r1[key][k]) for k, v in r0[key].items()), key
    single = LogSNRMonitor(num_bins=8, logsnr_range=EDGES, backend="reference")
    for s in range(STEPS):
        (l0, m0), (l1, m1) = batch(s), batch(100 + s)
        single(torch.cat([l0, l1]), torch.cat([m0, m1]))
    for k, v in single.stats().items():
        torch.testing.assert_close(r0["monitor"][k], v, rtol=1e-6, atol=0, msg=k)
    assert r0["monitor"]["count"].sum() == 2 * STEPS * 64


# -- the trainer's observer -------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["vaw", "uniform"])
def test_trainer_observes_each_sample_once(tmp_path, monkeypatch, weighting):
    """With a VAW weighting the observer reads its statistics: one VAW step per training step,
    and the checkpoint's "observer" entry is that VAW's state, in the layout it always had."""
    steps = []
    real = VarianceAwareWeighting.forward

    def counting(self, loss, lam):
        if self.training:
            steps.append(id(self))
        return real(self, loss, lam)

    monkeypatch.setattr(VarianceAwareWeighting, "forward", counting)
    res = train(tiny(tmp_path / "run", weighting=weighting, steps=3))
    state = load_checkpoint(res["checkpoint"])
    observer = state["observer"]
    assert set(observer) == {"M", "Q", "Z", "C", "weight", "step", "nonfinite", "_extra_state"}
    assert observer["C"].sum() == 3 * 16 and int(observer["step"]) == 3
    if weighting == "vaw":
        assert len(steps) == 3 and len(set(steps)) == 1
        assert all(torch.equal(v, state["weighting"]["vaw." + k]) for k, v in observer.items()
                   if isinstance(v, torch.Tensor))
    else:
        assert len(steps) == 3 and "vaw.M" not in state["weighting"]


# -- the trainer's SummaryWriter -----------------------------------------------------------------
def test_a_writer_that_cannot_be_created_is_one_line_on_stderr(tmp_path, monkeypatch, capsys):
    tensorboard = pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is in the [train] extra")
    from varweight_kernels.training.run_dir import MetricsLog

    def failing(log_dir):
        raise PermissionError(13, "Permission denied", log_dir)

    monkeypatch.setattr(tensorboard, "SummaryWriter", failing)
    log = MetricsLog(str(tmp_path), enabled=True)
    err = capsys.readouterr().err.strip()
    assert log.tb is None and len(err.splitlines()) == 1
    assert err.startswith("warning: no TensorBoard logs: cannot create the writer in ")
    assert "Permission denied" in err and "Traceback" not in err

    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # not installed
    assert MetricsLog(str(tmp_path), enabled=True).tb is None
    assert capsys.readouterr().err.strip() == ("warning: no TensorBoard logs: the tensorboard package is not "
                                               "installed (it comes with pip install 'varweight[train]')")
    assert MetricsLog(str(tmp_path), enabled=False).tb is None and capsys.readouterr().err == ""


def test_a_failing_tensorboard_write_stops_tensorboard_not_the_run(tmp_path, capsys):
    from varweight_kernels.training.run_dir import MetricsLog

    class Broken:
        def add_scalar(self, *args):
            raise FileNotFoundError(2, "No such file or directory", "tensorboard/events.out.tfevents.1")

    log = MetricsLog(str(tmp_path), enabled=True)
    capsys.readouterr()
    log.tb = Broken()
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.4})
    err = capsys.readouterr().err.strip()
    assert err == "warning: TensorBoard logging stopped: [Errno 2] No such file or directory: " \
                  "'tensorboard/events.out.tfevents.1'"
    assert log.tb is None and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    log.close()
