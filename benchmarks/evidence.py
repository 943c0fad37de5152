"""A convergence-budget study on one GPU (issue 22, item 4): many seeds x weightings at once.

The 8x8 digits proxy saturates within 1,000-2,000 steps, so it can only test early training.
This study trains on a harder proxy that ships offline, ``quad-digits``: 16x16 RGB images,
each a 2x2 grid of scikit-learn digits in one of three colours (digits from the training split
for training, from the held-out split for the reference), scored as ``fd_digits`` is: the
Frechet distance in the penultimate features of a classifier trained on the proxy (it predicts
the four digits and the four colours). Every (variant, seed) is its own small U-Net; all of
them train together as one vmapped network (``torch.func``), so one GPU runs 50 models at
once. Each model has its own optimiser state (Adam is elementwise), gradient clip, EMA and
weighting module; seeds pair data order, noise levels and noise across variants.

    python benchmarks/evidence.py --out OUT                 # the GPU study (5,000 steps, 10 seeds)
    python benchmarks/evidence.py --out OUT --miniature     # the same code in seconds on a CPU

It writes ``OUT/evidence.md`` and ``OUT/evidence.json``: per-seed final FD and AUC, paired
differences against uniform with Holm's correction (the confirmatory study's analysis, its
registered alpha and margin), wins and the across-seed std ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from varweight_kernels import VarianceAwareWeighting  # noqa: E402
from varweight_kernels.weightings import CauchyWeighting  # noqa: E402
from varweight_kernels.evaluation.digits_classifier import load_digits_split  # noqa: E402
from varweight_kernels.experiments.confirm import PREREGISTRATION, analyse  # noqa: E402
from varweight_kernels.training.ddpm_unet import UNet  # noqa: E402

PALETTE = torch.tensor([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.35, 0.45, 1.0]])
SIGMA_DATA, P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX = 0.5, -1.2, 1.2, 0.002, 80.0

FULL = dict(steps=5000, seeds=list(range(200, 210)), batch=64, channels=32, lr=1e-3, ema=0.999,
            eval_steps=(1000, 2000, 3000, 4000, 5000), eval_samples=500, sample_steps=18,
            ref_images=2000, classifier_steps=600, train_images=20000)
MINIATURE = dict(steps=6, seeds=[200, 201], batch=8, channels=8, lr=1e-3, ema=0.9, eval_steps=(3, 6),
                 eval_samples=32, sample_steps=3, ref_images=64, classifier_steps=5, train_images=256)


def variants() -> Dict[str, Callable[[], Callable]]:
    """label -> factory of a per-model weighting ``w(loss, lam) -> scalar`` (the library's where it has one)."""
    def min_snr(loss, lam, gamma=5.0):
        # min(SNR, gamma) / SNR with the published EDM SNR 1/sigma^2 (lam = log(sigma_data^2 / sigma^2))
        snr = lam.exp() / SIGMA_DATA ** 2
        return (loss * torch.clamp(gamma / snr, max=1.0)).mean()

    return {
        "uniform": lambda: (lambda loss, lam: loss.mean()),
        "vaw": lambda: VarianceAwareWeighting(num_bins=16, min_count=8),  # the default: power -1 x Cauchy prior
        "vaw__power=-1": lambda: VarianceAwareWeighting(num_bins=16, min_count=8, power=-1.0, prior=None),
        "seed-cauchy__alpha=0.05": lambda: CauchyWeighting(alpha=0.05),
        "min-snr__gamma=5": lambda: min_snr,
    }


# ---------------------------------------------------------------------------------------------
# the proxy
# ---------------------------------------------------------------------------------------------
def quad_digits(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator):
    """n images (n, 3, 16, 16) in [-1, 1] and labels (n, 8): four digits, then four colours."""
    pick = torch.randint(0, images.shape[0], (n, 4), generator=gen)
    colour = torch.randint(0, PALETTE.shape[0], (n, 4), generator=gen)
    gray = images[pick].float().div(255.0)[:, :, 0]                     # (n, 4, 8, 8)
    rgb = gray[:, :, None] * PALETTE[colour][..., None, None]            # (n, 4, 3, 8, 8)
    top = torch.cat([rgb[:, 0], rgb[:, 1]], dim=-1)
    bottom = torch.cat([rgb[:, 2], rgb[:, 3]], dim=-1)
    x = torch.cat([top, bottom], dim=-2) * 2.0 - 1.0
    return x, torch.cat([labels[pick], colour], dim=1)


class ProxyClassifier(nn.Module):
    """Predicts the four digits and colours; its 128-d penultimate layer is the FD feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU())
        self.heads = nn.Linear(128, 4 * 10 + 4 * 3)

    def forward(self, x):
        return self.heads(self.body(x))


def train_classifier(x, y, steps: int, device) -> ProxyClassifier:
    torch.manual_seed(0)
    net = ProxyClassifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (256,), generator=gen)
        out = net(x[i].to(device))
        yi = y[i].to(device)
        loss = sum(F.cross_entropy(out[:, 10 * k:10 * k + 10], yi[:, k]) for k in range(4))
        loss = loss + sum(F.cross_entropy(out[:, 40 + 3 * k:43 + 3 * k], yi[:, 4 + k]) for k in range(4))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def frechet(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    ca, cb = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    with warnings.catch_warnings():  # a miniature's few samples give a singular covariance
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2.0 * covmean))


# ---------------------------------------------------------------------------------------------
# many models as one
# ---------------------------------------------------------------------------------------------
def edm_denoise(fn, params, buffers, x, sigma):
    """EDM preconditioning around the vmapped network: x (N, B, C, H, W), sigma (N, B)."""
    s = sigma[..., None, None, None]
    c_in = 1.0 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_skip = SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2)
    c_out = s * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip * x + c_out * fn(params, buffers, c_in * x, sigma.log() / 4.0)


@torch.no_grad()
def sample(fn, params, buffers, n_models: int, n: int, steps: int, device, seed: int) -> torch.Tensor:
    """Heun's 2nd-order sampler on the Karras schedule (rho 7), the same noise for every model."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((1, n, 3, 16, 16), generator=gen, device=device)
    t = torch.arange(steps, device=device, dtype=torch.float64) / max(steps - 1, 1)
    sig = (SIGMA_MAX ** (1 / 7) + t * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
    sig = torch.cat([sig, sig.new_zeros(1)]).float()
    x = x0.expand(n_models, -1, -1, -1, -1) * sig[0]
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        d = (x - edm_denoise(fn, params, buffers, x, s.expand(n_models, n))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - edm_denoise(fn, params, buffers, x_next, s_next.expand(n_models, n))) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x.clamp(-1, 1)


def run_study(cfg: Dict, device: torch.device, log=print) -> Dict:
    """Train every (variant, seed) model together; returns {label: {"final": {seed: fd}, "auc": {...}}}."""
    xtr, ytr, xte, yte = load_digits_split()
    gen = torch.Generator().manual_seed(1234)
    train_x, train_y = quad_digits(xtr, ytr, cfg["train_images"], gen)
    ref_x, ref_y = quad_digits(xte, yte, cfg["ref_images"], gen)
    clf = train_classifier(train_x, train_y, cfg["classifier_steps"], device)
    feats = lambda im: clf.body(im.to(device)).double().cpu().numpy()  # noqa: E731
    with torch.no_grad():
        ref_feat = feats(ref_x)
        acc = (clf(ref_x.to(device))[:, :40].view(-1, 4, 10).argmax(-1).cpu() == ref_y[:, :4]).float().mean().item()
        floor = frechet(feats(quad_digits(xte, yte, cfg["ref_images"], gen)[0]), ref_feat)
    log(f"proxy classifier: held-out digit accuracy {acc:.3f}; FD floor (two reference draws) {floor:.3f}")

    labels, seeds = list(variants()), list(cfg["seeds"])
    models, weightings, owners = [], [], []
    for label in labels:
        for seed in seeds:
            torch.manual_seed(seed)  # paired: the same initial network for every variant of a seed
            models.append(UNet(3, 16, base_channels=cfg["channels"], channel_mults=(1, 2), num_res_blocks=1,
                               attn_resolutions=(), embedding="fourier").to(device))
            w = variants()[label]()
            weightings.append(w.to(device) if isinstance(w, nn.Module) else w)
            owners.append((label, seed))
    n_models = len(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    fn = vmap(lambda p, b, x, c: functional_call(base, (p, b), (x, c)))
    ema = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg["lr"])
    seed_gens = {s: torch.Generator().manual_seed(s) for s in seeds}
    scores = {label: {"final": {}, "auc": {}, "curve": {}} for label in labels}
    t0 = time.time()
    for step in range(1, cfg["steps"] + 1):
        # one batch, level and noise draw per seed, shared by that seed's variants
        per_seed = {}
        for s in seeds:
            g = seed_gens[s]
            i = torch.randint(0, train_x.shape[0], (cfg["batch"],), generator=g)
            sigma = (P_MEAN + P_STD * torch.randn(cfg["batch"], generator=g)).exp().clamp(SIGMA_MIN, SIGMA_MAX)
            per_seed[s] = (train_x[i], sigma, torch.randn((cfg["batch"], 3, 16, 16), generator=g))
        y = torch.stack([per_seed[s][0] for _, s in owners]).to(device)
        sigma = torch.stack([per_seed[s][1] for _, s in owners]).to(device)
        noise = torch.stack([per_seed[s][2] for _, s in owners]).to(device)
        d = edm_denoise(fn, params, buffers, y + noise * sigma[..., None, None, None], sigma)
        lam_w = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        loss = (lam_w[..., None, None, None] * (d - y) ** 2).mean(dim=(2, 3, 4))  # (N, B)
        lam = 2.0 * math.log(SIGMA_DATA) - 2.0 * sigma.log()
        total = sum(w(loss[m], lam[m]) for m, w in enumerate(weightings))
        opt.zero_grad(set_to_none=True)
        total.backward()
        norms = torch.stack([g.grad.flatten(1).pow(2).sum(1) for g in params.values()]).sum(0).sqrt()
        scale = torch.clamp(1.0 / (norms + 1e-6), max=1.0)  # clip each model's gradient norm to 1
        for g in params.values():
            g.grad.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        opt.step()
        with torch.no_grad():
            for k, v in params.items():
                ema[k].lerp_(v.detach(), 1.0 - cfg["ema"])
        if step in cfg["eval_steps"]:
            imgs = sample(fn, ema, buffers, n_models, cfg["eval_samples"], cfg["sample_steps"], device, seed=step)
            with torch.no_grad():
                for m, (label, seed) in enumerate(owners):
                    fd = frechet(feats(imgs[m]), ref_feat)
                    scores[label]["curve"].setdefault(seed, []).append((step, fd))
            log(f"step {step}/{cfg['steps']} ({time.time() - t0:.0f}s): uniform mean FD "
                f"{np.mean([c[-1][1] for c in scores['uniform']['curve'].values()]):.3f}")
    for label in labels:
        for seed, curve in scores[label]["curve"].items():
            st, fd = np.array([c[0] for c in curve], float), np.array([c[1] for c in curve])
            scores[label]["final"][seed] = float(fd[-1])
            scores[label]["auc"][seed] = float(np.trapezoid(fd, st) / (st[-1] - st[0])) if st.size > 1 else float(fd[-1])
    return {"scores": scores, "classifier_acc": acc, "fd_floor": floor, "seconds": time.time() - t0,
            "labels": labels, "n_models": n_models}


def write_report(result: Dict, cfg: Dict, out: Path, device: torch.device) -> Path:
    reg = dict(PREREGISTRATION, variants={label: {} for label in result["labels"]})
    scores = {k: {"final": v["final"], "auc": v["auc"]} for k, v in result["scores"].items()}
    a = analyse(scores, reg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Evidence at a convergence budget: quad-digits, {cfg['steps']} steps, {len(cfg['seeds'])} seeds",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {name}: {result['n_models']} models "
             f"trained at once in {result['seconds']:.0f} s. Proxy classifier digit accuracy "
             f"{result['classifier_acc']:.3f}, FD floor {result['fd_floor']:.3f}. Differences are variant - uniform "
             f"(lower is better), Holm over {len(a['tests'])} tests at alpha {reg['alpha']}.", "",
             "| variant | final FD mean | final − uniform (Holm CI) | p (Holm) | lower on | AUC − uniform (Holm CI) "
             "| p (Holm) | std ratio (95% bootstrap) |", "|---|---|---|---|---|---|---|---|"]
    by = {(t["variant"], t["metric"]): t for t in a["tests"]}
    for label in result["labels"]:
        m = np.mean(list(scores[label]["final"].values()))
        if label == "uniform":
            lines.append(f"| `{label}` | {m:.3f} | - | - | - | - | - | 1 |")
            continue
        f, u, s = by[(label, "final")], by[(label, "auc")], a["spread"][label]
        lines.append(f"| `{label}` | {m:.3f} | {f['mean']:+.3f} ({f['lo']:+.3f} to {f['hi']:+.3f}) | {f['p_holm']:.2g} "
                     f"| {f['wins']}/{f['n']} | {u['mean']:+.3f} ({u['lo']:+.3f} to {u['hi']:+.3f}) | "
                     f"{u['p_holm']:.2g} | {s['ratio']:.2f} ({s['lo']:.2f} to {s['hi']:.2f}) |")
    lines += ["", "Per-seed final FD:", ""] + [
        f"- `{label}`: " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(scores[label]["final"].items()))
        for label in result["labels"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.md").write_text("\n".join(lines) + "\n")
    payload = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "device": name,
               **{k: v for k, v in result.items() if k != "scores"},
               "scores": {k: {m: {str(s): x for s, x in d.items()} for m, d in v.items() if m != "curve"}
                          for k, v in result["scores"].items()},
               "tests": a["tests"], "verdicts": a["verdicts"], "spread": a["spread"]}
    (out / "evidence.json").write_text(json.dumps(payload, indent=1, default=float))
    return out / "evidence.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for evidence.md and evidence.json")
    ap.add_argument("--miniature", action="store_true", help="a few steps, two seeds, tiny nets (CPU test)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = dict(MINIATURE if args.miniature else FULL)
    if args.steps:
        cfg["steps"] = args.steps
        cfg["eval_steps"] = tuple(sorted({max(1, args.steps * k // 5) for k in range(1, 6)}))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = run_study(cfg, device)
    path = write_report(result, cfg, Path(args.out), device)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
