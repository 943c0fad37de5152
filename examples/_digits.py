"""What the three examples share and is not about VAW: digits data, a tiny U-Net, the eval check,
the command line.

scikit-learn's 8x8 digits ship with it, so the examples run offline; the U-Net is built from a
config, so nothing is downloaded.
"""
import argparse

import torch
from diffusers import UNet2DModel
from sklearn.datasets import load_digits

from varweight_kernels import VarianceAwareWeighting


def digits_images() -> torch.Tensor:
    """The 1797 digits as (N, 1, 8, 8) float32 in [-1, 1]."""
    pixels = torch.tensor(load_digits().images, dtype=torch.float32)  # 0..16
    return (pixels / 8.0 - 1.0).unsqueeze(1)


def random_batch(images: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return images[torch.randint(len(images), (batch_size,), generator=generator)]


def tiny_unet() -> UNet2DModel:
    """A two-level diffusers U-Net for 8x8 single-channel images (164k parameters)."""
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)


def eval_leaves_state_untouched(vaw: VarianceAwareWeighting, per_sample: torch.Tensor, lam: torch.Tensor) -> bool:
    """Call ``vaw`` in eval mode and report whether its state (every buffer) stayed bit for bit the same."""
    before = {name: buffer.clone() for name, buffer in vaw.named_buffers()}
    vaw.eval()
    vaw(per_sample, lam)
    vaw.train()
    return all(torch.equal(before[name], buffer) for name, buffer in vaw.named_buffers())


def example_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every example's ``main`` takes; their names are its keyword arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def print_summary(result: dict) -> None:
    stats = result["vaw"].stats()
    seen = stats["count"] > 0
    print(f"logsnr_range={result['vaw'].config.logsnr_range} unweighted loss: first {result['losses'][0]:.3f} "
          f"last {result['losses'][-1]:.3f}")
    print("weights of the filled bins:", [round(w, 2) for w in stats["weight"][seen].tolist()])
    print("eval mode left the state untouched:", result["eval_state_unchanged"])
