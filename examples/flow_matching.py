"""VAW in a rectified-flow training loop with logit-normal t, as Stable Diffusion 3 trains.

``x_t = (1 - t) x0 + t eps``, the network predicts the velocity ``eps - x0``, and ``t`` is drawn
with diffusers' ``compute_density_for_timestep_sampling("logit_normal", ...)``. Then
``lam = logsnr.from_flow_t(t) = -2 logit(t)`` is normal (mean ``-2 logit_mean``, std
``2 logit_std``), unbounded: the range covers 99.9% of it and the tails share the edge bins.
diffusers' SD3 script rounds ``t`` to its scheduler's 1000 ``sigmas``; ``from_flow_t`` of those
is the lam there (its first sigma is 1, lam = -inf: the lowest bin). Digits on CPU, offline.

    python examples/flow_matching.py --steps 300
"""
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

from _digits import (digits_images, eval_leaves_state_untouched, example_parser, print_summary, random_batch,
                     tiny_unet)
from varweight_kernels import VarianceAwareWeighting, logsnr


def sample_t(batch_size, generator, logit_mean=0.0, logit_std=1.0):
    return compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=logit_mean,
                                                 logit_std=logit_std, generator=generator)


def flow_loss(model, x0, generator):
    """Per-sample unweighted velocity loss (B,) and lam (B,) of one rectified-flow batch."""
    t = sample_t(len(x0), generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    velocity = model(x_t, t * 1000).sample                              # timestep scale of diffusers' SD3
    per_sample = F.mse_loss(velocity, eps - x0, reduction="none").mean(dim=(1, 2, 3))
    return per_sample, logsnr.from_flow_t(t)


def main(steps=300, batch_size=64, num_bins=16, lr=2e-3, seed=0):
    """Train ``steps`` steps; returns the per-step unweighted losses, the VAW module and checks."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = digits_images()
    model = tiny_unet()
    training_lams = logsnr.from_flow_t(sample_t(100_000, torch.Generator().manual_seed(seed + 1)))
    vaw = VarianceAwareWeighting(num_bins=num_bins,
                                 logsnr_range=logsnr.suggest_logsnr_range(training_lams, coverage=0.999))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    losses = []
    for _ in range(steps):
        per_sample, lam = flow_loss(model, random_batch(images, batch_size, generator), generator)
        loss = vaw(per_sample, lam)                                     # weighted mean, updates VAW
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(per_sample.mean().item())

    with torch.no_grad():
        held_out = flow_loss(model, random_batch(images, batch_size, generator), generator)
    return {"losses": losses, "vaw": vaw, "model": model,
            "eval_state_unchanged": eval_leaves_state_untouched(vaw, *held_out)}


if __name__ == "__main__":
    print_summary(main(**vars(example_parser(__doc__).parse_args())))
