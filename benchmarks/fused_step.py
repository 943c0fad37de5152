"""Two fused training steps and their backward on the GPU, for compute-sanitizer (gpu_check.sh).

    python benchmarks/fused_step.py cuda|triton

B = 2^16 + 3 samples (several fused blocks, so the last-block ticket runs; a partial vector at
the end), K = 64; prints the step count, ``out`` and the gradient sum.
"""
import sys

import torch

from varweight_kernels.backends import get_backend
from varweight_kernels.config import VAWConfig


def main(name: str) -> None:
    backend = get_backend(name)
    backend.fused = True
    batch, num_bins = (1 << 16) + 3, 64
    params = VAWConfig(num_bins=num_bins, min_count=1).kernel_params()
    state = [torch.zeros(num_bins, device="cuda") for _ in range(3)] + [
        torch.zeros(num_bins, dtype=torch.float64, device="cuda"), torch.ones(num_bins, device="cuda"),
        torch.zeros((), dtype=torch.int64, device="cuda"), torch.zeros((), dtype=torch.int64, device="cuda")]
    loss, lam = torch.rand(batch, device="cuda"), torch.randn(batch, device="cuda") * 6
    for _ in range(2):
        out, w = backend.step(loss, lam, *state, params, True)
        grad = backend.backward(torch.ones((), device="cuda"), w, torch.float32)
    torch.cuda.synchronize()
    print(name, "fused steps:", int(state[5]), "out", float(out), "grad sum", float(grad.sum()))


if __name__ == "__main__":
    main(sys.argv[1])
