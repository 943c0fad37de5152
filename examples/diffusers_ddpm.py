"""VAW in a diffusers DDPM training loop: ``UNet2DModel`` + ``DDPMScheduler``, eps or v prediction.

The lam of a discrete schedule is a table over its timesteps (``logsnr.from_alphas_cumprod``),
computed once and indexed by the batch's timesteps; the per-sample loss is the unweighted MSE
against the scheduler's target. Trains on scikit-learn's digits on CPU, nothing is downloaded.

    python examples/diffusers_ddpm.py --prediction-type v_prediction --steps 300
"""
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from _digits import (digits_images, eval_leaves_state_untouched, example_parser, print_summary, random_batch,
                     tiny_unet)
from varweight_kernels import VarianceAwareWeighting, logsnr


def ddpm_loss(unet, scheduler, lam_table, x0, generator):
    """Per-sample unweighted loss (B,) and lam (B,) of one DDPM training batch."""
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = scheduler.add_noise(x0, eps, t)
    target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    per_sample = F.mse_loss(unet(x_t, t).sample, target, reduction="none").mean(dim=(1, 2, 3))
    return per_sample, lam_table[t]


def main(steps=300, batch_size=64, prediction_type="epsilon", num_bins=16, lr=2e-3, seed=0):
    """Train ``steps`` steps; returns the per-step unweighted losses, the VAW module and checks."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = digits_images()
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    lam_table = logsnr.from_alphas_cumprod(scheduler)                 # lam of every timestep, once
    vaw = VarianceAwareWeighting(num_bins=num_bins, logsnr_range=logsnr.suggest_logsnr_range(lam_table))
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)

    losses = []
    for _ in range(steps):
        per_sample, lam = ddpm_loss(unet, scheduler, lam_table, random_batch(images, batch_size, generator),
                                    generator)
        loss = vaw(per_sample, lam)                                   # weighted mean, updates VAW
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(per_sample.mean().item())

    with torch.no_grad():
        held_out = ddpm_loss(unet, scheduler, lam_table, random_batch(images, batch_size, generator), generator)
    return {"losses": losses, "vaw": vaw, "model": unet, "scheduler": scheduler,
            "eval_state_unchanged": eval_leaves_state_untouched(vaw, *held_out)}


if __name__ == "__main__":
    parser = example_parser(__doc__)
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    print_summary(main(**vars(parser.parse_args())))
