"""Drop VAW into an existing diffusion training loop: per-sample loss + log-SNR in, scalar loss out.

A toy denoiser on generated 2-D data, EDM noise levels. Run: python examples/drop_in.py
"""
import torch

from varweight_kernels import VarianceAwareWeighting

torch.manual_seed(0)
sigma_data = 0.5
model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
vaw = VarianceAwareWeighting(num_bins=32, min_count=16)           # 1. create once

for step in range(300):
    x0 = sigma_data * torch.randn(256, 2) * torch.tensor([1.0, 0.3])
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(256)).clamp(0.002, 80)
    noisy = x0 + sigma[:, None] * torch.randn_like(x0)
    pred = model(torch.cat([noisy / (sigma[:, None] ** 2 + sigma_data**2).sqrt(), sigma.log()[:, None] / 4], 1))
    per_sample = ((pred - x0) ** 2).mean(dim=1)                  # 2. per-sample loss (B,)
    lam = torch.log(sigma_data**2 / sigma**2)                    # 3. log-SNR (B,)
    loss = vaw(per_sample, lam)                                  # 4. weighted scalar loss
    opt.zero_grad()
    loss.backward()
    opt.step()

stats = vaw.stats()
seen = stats["count"] > 0
print(f"backend={vaw.resolved_backend()} steps={int(stats['step'])} final loss={loss.item():.4f}")
print(f"weights over seen bins: min={stats['weight'][seen].min():.3f} max={stats['weight'][seen].max():.3f}")
