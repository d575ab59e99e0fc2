"""One rank of the two-process quantizer test (launched by tests/test_quantizer.py via torchrun).

Each rank trains two small quantizers on *different* data (seeded by rank) over gloo, then saves
its buffers to ``<out>/rank<r>.safetensors`` for the test to compare.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
# Import only the quantizer modules: a stub package skips evotok/__init__.py (the model stack).
_pkg = types.ModuleType("evotok")
_pkg.__path__ = [str(REPO / "evotok")]
sys.modules.setdefault("evotok", _pkg)

from evotok.quantizer import ResidualQuantizer  # noqa: E402

STEPS = 6
TOKENS = 96


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # different data *and* different RNG streams per rank
    centres = torch.randn(12, 8) * 3
    restarting = ResidualQuantizer(num_stages=3, codebook_size=32, dim=8, warmup_steps=2, kmeans_iters=3).train()
    plain = ResidualQuantizer(
        num_stages=2, codebook_size=16, dim=8, decay=0.9, warmup_steps=0, restart=False, kmeans_init=False
    ).train()
    restarts = torch.zeros((), dtype=torch.long)
    for _ in range(STEPS):
        x = centres[torch.randint(12, (TOKENS,))] + 0.3 * torch.randn(TOKENS, 8)
        restarting(x)
        restarts += restarting.restarted.sum()
        plain(x)
    tensors = {f"restarting.{k}": v for k, v in restarting.state_dict().items()}
    tensors.update({f"plain.{k}": v for k, v in plain.state_dict().items()})
    tensors["restarts"] = restarts
    tensors["world_tokens"] = torch.tensor(TOKENS * dist.get_world_size())
    tensors["steps"] = torch.tensor(STEPS)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
