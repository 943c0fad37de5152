"""VAW in an EDM training loop (Karras et al. 2022): log-normal sigma, diffusers' EDM preconditioning.

``x = x0 + sigma eps`` with ``ln sigma ~ N(P_mean, P_std**2)``; the U-Net sees
``c_in(sigma) x`` and ``c_noise(sigma)`` and ``D = c_skip x + c_out F`` (``EDMEulerScheduler``'s
``precondition_*``). The per-sample loss is EDM's ``lambda(sigma) * |D - x0|**2``, the squared
error of the raw network output ``F``, and ``lam = logsnr.from_sigma(sigma) = -2 ln sigma``
(``from_sigma(sigma, sigma_data=...)`` gives ``train_cifar.py``'s shifted convention).
Digits on CPU, offline.

    python examples/edm.py --steps 300
"""
import torch
from diffusers import EDMEulerScheduler

from _digits import (digits_images, eval_leaves_state_untouched, example_parser, print_summary, random_batch,
                     tiny_unet)
from varweight_kernels import VarianceAwareWeighting, logsnr

P_MEAN, P_STD = -1.2, 1.2


def sample_sigma(batch_size, generator):
    return torch.exp(P_MEAN + P_STD * torch.randn(batch_size, generator=generator))


def edm_loss(model, scheduler, x0, generator):
    """Per-sample EDM loss (B,) and lam (B,) of one batch."""
    sigma = sample_sigma(len(x0), generator)
    sigma_img = sigma[:, None, None, None]
    x = x0 + sigma_img * torch.randn(x0.shape, generator=generator)
    raw = model(scheduler.precondition_inputs(x, sigma_img), scheduler.precondition_noise(sigma)).sample
    denoised = scheduler.precondition_outputs(x, raw, sigma_img)
    sigma_data = scheduler.config.sigma_data
    edm_weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    per_sample = edm_weight * ((denoised - x0) ** 2).mean(dim=(1, 2, 3))
    return per_sample, logsnr.from_sigma(sigma)


def main(steps=300, batch_size=64, num_bins=16, lr=2e-3, seed=0):
    """Train ``steps`` steps; returns the per-step unweighted losses, the VAW module and checks."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = digits_images()
    model = tiny_unet()
    scheduler = EDMEulerScheduler(sigma_data=0.5)
    training_lams = logsnr.from_sigma(sample_sigma(100_000, torch.Generator().manual_seed(seed + 1)))
    vaw = VarianceAwareWeighting(num_bins=num_bins,
                                 logsnr_range=logsnr.suggest_logsnr_range(training_lams, coverage=0.999))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    losses = []
    for _ in range(steps):
        per_sample, lam = edm_loss(model, scheduler, random_batch(images, batch_size, generator), generator)
        loss = vaw(per_sample, lam)                                     # weighted mean, updates VAW
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(per_sample.mean().item())

    with torch.no_grad():
        held_out = edm_loss(model, scheduler, random_batch(images, batch_size, generator), generator)
    return {"losses": losses, "vaw": vaw, "model": model,
            "eval_state_unchanged": eval_leaves_state_untouched(vaw, *held_out)}


if __name__ == "__main__":
    print_summary(main(**vars(example_parser(__doc__).parse_args())))
