"""VAW in lucidrains' denoising-diffusion-pytorch: ``GaussianDiffusion`` trained by its ``Trainer``.

Three things differ from a loop of your own (docs/USING.md, "lucidrains"):

1. ``GaussianDiffusion`` multiplies each sample's loss by its ``loss_weight`` buffer (1 for
   ``pred_noise``, SNR for ``pred_x0``, SNR/(SNR+1) for ``pred_v``; min-SNR-clipped with
   ``min_snr_loss_weight``). VAW must get the unweighted loss, so ``VAWGaussianDiffusion`` sets
   it to 1. Being a buffer, it is saved with the model and comes back with any checkpoint
   loaded into it (a plain ``GaussianDiffusion``'s brings its SNR weights), so a load hook sets
   it to 1 again after every ``load_state_dict``.
2. The ``Trainer`` calls ``model(images)`` and checkpoints only the model, its EMA and the
   optimiser. So ``vaw`` is a submodule of the diffusion, whose ``forward`` draws t, takes the
   per-sample loss (``loss_reduction="none"``) and returns ``vaw(loss, lam)``: ``Trainer.save``
   and ``Trainer.load`` carry VAW's state in ``data["model"]`` (keys ``vaw.*``).
3. The ``Trainer``'s EMA (ema_pytorch) deep-copies the diffusion, ``vaw`` with it, then averages
   the copy's float buffers (VAW's M, Q, Z, C, weight) and never updates its integer ones (step,
   nonfinite). ``trainer.ema.ema_model.vaw`` (``ema_model.vaw.*`` in ``data["ema"]``) is
   therefore not a VAW state: sample from the EMA model (sampling never calls ``vaw``), but
   never load VAW from it, and to continue training from EMA weights take the ``vaw.*`` entries
   from ``data["model"]``.

Trains on scikit-learn's digits on CPU (written to a folder of PNGs, as the Trainer reads
images from a folder); nothing is downloaded.

    ACCELERATE_USE_CPU=1 python examples/lucidrains_ddpm.py --steps 300
"""
import os
import tempfile
from pathlib import Path

import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet
from PIL import Image

from _digits import digits_images, eval_leaves_state_untouched, example_parser, print_summary
from varweight_kernels import VarianceAwareWeighting, logsnr


def _unit_loss_weight(module, incompatible_keys) -> None:
    module.loss_weight.fill_(1.0)  # whatever a checkpoint held: VAW gets the unweighted loss


class VAWGaussianDiffusion(GaussianDiffusion):
    """``GaussianDiffusion`` whose training loss is VAW's weighted mean of the unweighted per-sample loss."""

    def __init__(self, model, *, num_bins: int = 32, **kwargs):
        super().__init__(model, **kwargs)
        self.loss_weight.fill_(1.0)
        self.register_load_state_dict_post_hook(_unit_loss_weight)
        # t = T of the sigmoid/cosine schedules is clipped far below the rest; the range leaves it to the edge bin
        self.vaw = VarianceAwareWeighting(num_bins=num_bins,
                                          logsnr_range=logsnr.suggest_logsnr_range(logsnr.from_schedule(self)))

    def forward(self, img, *args, **kwargs):
        t = self.random_times(img.shape[0])
        per_sample = super().forward(img, *args, times=t, loss_reduction="none", **kwargs)
        return self.vaw(per_sample, logsnr.from_schedule(self, t))


def write_digits(folder: Path, count: int = 512) -> None:
    """The first ``count`` digits as 8x8 greyscale PNGs (the Trainer reads a folder of images)."""
    pixels = ((digits_images()[:count, 0] + 1) * 127.5).round().to(torch.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:04d}.png")


def make_trainer(folder: Path, results: Path, steps: int, batch_size: int, lr: float, num_bins: int):
    unet = Unet(dim=16, dim_mults=(1, 2), channels=1)
    diffusion = VAWGaussianDiffusion(unet, image_size=8, timesteps=1000, sampling_timesteps=10, num_bins=num_bins)
    trainer = Trainer(diffusion, str(folder), train_batch_size=batch_size, train_lr=lr, train_num_steps=steps,
                      save_and_sample_every=steps, num_samples=4, results_folder=str(results),
                      augment_horizontal_flip=False, calculate_fid=False)
    return diffusion, trainer


def main(steps=300, batch_size=64, num_bins=16, lr=2e-3, seed=0):
    """Train ``steps`` steps with lucidrains' Trainer, save, load into a fresh Trainer; returns the
    per-step unweighted losses, the modules and the checks."""
    os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # accelerate on CPU even where a GPU is visible
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder, results = Path(tmp) / "digits", Path(tmp) / "results"
        folder.mkdir()
        write_digits(folder)
        diffusion, trainer = make_trainer(folder, results, steps, batch_size, lr, num_bins)
        losses = []  # the unweighted batch means, read where they enter VAW
        hook = diffusion.vaw.register_forward_hook(lambda vaw, args, out: losses.append(args[0].mean().item()))
        trainer.train()  # saves model-1.pt at the last step
        hook.remove()

        reloaded, fresh = make_trainer(folder, results, steps, batch_size, lr, num_bins)
        fresh.load(1)
    vaw = diffusion.vaw
    t = torch.randint(1000, (batch_size,))
    with torch.no_grad():
        per_sample = diffusion.p_losses(digits_images()[:batch_size], t, loss_reduction="none")  # in [-1, 1]
    return {"losses": losses, "vaw": vaw, "model": diffusion, "scheduler": diffusion, "reloaded": reloaded,
            "ema_vaw": trainer.ema.ema_model.vaw,
            "eval_state_unchanged": eval_leaves_state_untouched(vaw, per_sample, logsnr.from_schedule(diffusion, t))}


if __name__ == "__main__":
    print_summary(main(**vars(example_parser(__doc__).parse_args())))
