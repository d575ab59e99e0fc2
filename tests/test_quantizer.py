"""Residual quantizer: the chain, the EMA codebooks, restarts, helpers and data parallelism."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evotok.nearest import nearest_code_reference
from evotok.quantizer import QuantizerOutput, ResidualQuantizer

REPO = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, clusters: int = 20, seed: int = 0) -> torch.Tensor:
    """``n`` samples of one fixed mixture of ``clusters`` Gaussians; ``seed`` picks the samples."""
    centres = 2.0 * torch.randn(clusters, dim, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    return centres[torch.randint(clusters, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)


def set_state(rq: ResidualQuantizer, embed: torch.Tensor, cluster_size: torch.Tensor) -> None:
    """Put the quantizer in a known, initialised state."""
    rq.embed.copy_(embed)
    rq.cluster_size.copy_(cluster_size)
    rq.embed_sum.copy_(embed * cluster_size.unsqueeze(-1))
    rq.initted.fill_(True)


def test_output_shapes_and_chain() -> None:
    rq = ResidualQuantizer(num_stages=3, codebook_size=16, dim=4).eval()
    x = torch.randn(2, 5, 5, 4)
    out = rq(x)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == (2, 5, 5, 3) and out.codes.dtype == torch.long
    assert out.prefix_sums.shape == (3, 2, 5, 5, 4) and not out.prefix_sums.requires_grad
    assert out.commitment_loss.dim() == 0 and out.residual_norms.shape == (3,)
    # The chain by hand: each stage picks the nearest code of the residual it is given.
    flat, residual = x.reshape(-1, 4), x.reshape(-1, 4).clone()
    codes = out.codes.reshape(-1, 3)
    for i in range(3):
        assert torch.equal(codes[:, i], nearest_code_reference(residual, rq.embed[i]))
        residual = residual - rq.embed[i][codes[:, i]]
    assert torch.allclose(out.prefix_sums[-1].reshape(-1, 4), flat - residual, atol=1e-5)
    assert torch.allclose(out.residual_norms[-1], residual.norm(dim=-1).mean(), atol=1e-5)
    expected_commitment = torch.stack([((x - q) ** 2).mean() for q in out.prefix_sums]).mean()
    assert torch.allclose(out.commitment_loss, expected_commitment)


def test_eval_does_not_touch_codebooks() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4).eval()
    before = {k: v.clone() for k, v in rq.state_dict().items()}
    rq(torch.randn(30, 4))
    rq.train()
    rq(torch.randn(30, 4), update=False)
    for key, value in rq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_residual_norm_falls_with_depth_after_training() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_stages=4, codebook_size=32, dim=8, warmup_steps=5, kmeans_iters=2).train()
    for step in range(8):
        out = rq(clustered(512, 8, seed=step))
    assert rq.initted and int(rq.step) == 8
    rq.eval()
    out = rq(clustered(512, 8, seed=100))
    norms = out.residual_norms
    assert torch.all(norms[1:] < norms[:-1]), norms
    input_norm = clustered(512, 8, seed=100).norm(dim=-1).mean()
    assert norms[0] < 0.5 * input_norm
    # Deeper prefixes reconstruct better, so the per-depth errors fall too.
    x = clustered(512, 8, seed=100)
    errors = torch.stack([((x - q) ** 2).mean() for q in out.prefix_sums])
    assert torch.all(errors[1:] < errors[:-1])


def test_first_training_step_initialises_from_data() -> None:
    torch.manual_seed(0)
    x = clustered(200, 4)
    rq = ResidualQuantizer(num_stages=2, codebook_size=16, dim=4, kmeans_init=False, restart=False).train()
    assert not rq.initted
    rq._initialise(x)
    # Stage 1's codes are rows of the batch; every code starts with one pseudo-observation.
    assert all(any(torch.equal(code, row) for row in x) for code in rq.embed[0])
    assert torch.equal(rq.cluster_size, torch.ones(2, 16)) and torch.equal(rq.embed_sum, rq.embed)
    assert rq.initted and int(rq.step) == 0
    # With k-means the initial codebook fits the batch better than raw samples.
    torch.manual_seed(0)
    km = ResidualQuantizer(num_stages=1, codebook_size=16, dim=4, kmeans_iters=10)
    km._initialise(x)
    torch.manual_seed(0)
    raw = ResidualQuantizer(num_stages=1, codebook_size=16, dim=4, kmeans_init=False)
    raw._initialise(x)

    def error(q: ResidualQuantizer) -> torch.Tensor:
        return q.eval()(x).residual_norms[0]

    assert error(km) < error(raw)


def test_ema_update_matches_hand_computation() -> None:
    decay, eps = 0.9, 0.1
    rq = ResidualQuantizer(
        num_stages=1, codebook_size=2, dim=1, decay=decay, eps=eps, warmup_steps=0, restart=False
    ).train()
    set_state(rq, torch.tensor([[[0.0], [10.0]]]), torch.tensor([[1.0, 1.0]]))
    out = rq(torch.tensor([[1.0], [2.0], [9.0]]))
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # counts [2, 1], sums [3, 9]
    cs = [0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 1]  # [1.1, 1.0]
    es = [0.9 * 0 + 0.1 * 3, 0.9 * 10 + 0.1 * 9]  # [0.3, 9.9]
    n = sum(cs)
    smoothed = [(c + eps) / (n + 2 * eps) * n for c in cs]
    embed = [e / s for e, s in zip(es, smoothed)]
    assert torch.allclose(rq.cluster_size, torch.tensor([cs]))
    assert torch.allclose(rq.embed_sum, torch.tensor([es]).unsqueeze(-1))
    assert torch.allclose(rq.embed, torch.tensor([embed]).unsqueeze(-1))
    assert int(rq.step) == 1
    # Outputs used the codebook from before the update.
    assert out.prefix_sums.flatten().tolist() == [0.0, 0.0, 10.0]


def test_decay_warm_up_ramps_to_decay() -> None:
    rq = ResidualQuantizer(num_stages=1, codebook_size=4, dim=2, decay=0.99, warmup_steps=3, restart=False).train()
    seen = []
    for _ in range(5):
        seen.append(float(rq.current_decay()))
        rq(torch.randn(16, 2))
    assert seen == pytest.approx([0.99 / 4, 0.99 * 2 / 4, 0.99 * 3 / 4, 0.99, 0.99])


def test_restart_replaces_exactly_the_dead_codes() -> None:
    torch.manual_seed(0)
    stages, size, dim = 2, 8, 3
    rq = ResidualQuantizer(num_stages=stages, codebook_size=size, dim=dim, dead_threshold=1.0)
    counts = torch.tensor([[5.0, 0.2, 1.0, 0.99, 3.0, 0.0, 2.0, 7.0], [0.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.1]])
    embed = torch.randn(stages, size, dim)
    set_state(rq, embed, counts)
    stage_inputs = torch.randn(stages, 50, dim)
    dead = rq.restart_dead_codes(stage_inputs)
    assert torch.equal(dead, counts < 1.0)
    assert rq.restarted.tolist() == [3, 2]
    assert torch.equal(rq.embed[~dead], embed[~dead])
    assert torch.equal(rq.cluster_size[~dead], counts[~dead])
    for stage in range(stages):
        replaced = rq.embed[stage][dead[stage]]
        rows = stage_inputs[stage]
        matches = (replaced[:, None, :] == rows[None, :, :]).all(-1)
        assert torch.all(matches.any(-1)), "a restarted code is not one of its stage's residuals"
        assert len({int(m.nonzero()[0]) for m in matches}) == replaced.shape[0], "restart vectors repeat"
    assert torch.all(rq.cluster_size[dead] == 1.0)
    assert torch.equal(rq.embed_sum[dead], rq.embed[dead] * 1.0)
    # Not due: nothing changes.
    state = rq.embed.clone()
    rq.cluster_size[0, 0] = 0.0
    rq.restart_dead_codes(stage_inputs, due=torch.tensor(False))
    assert torch.equal(rq.embed, state)


def test_restart_every_gates_restarts_during_training() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_stages=1, codebook_size=64, dim=2, restart_every=3, warmup_steps=0).train()
    restarted = []
    for _ in range(6):
        rq(torch.randn(16, 2) * 0.01)  # 16 rows cannot keep 64 codes alive
        restarted.append(int(rq.restarted.sum()))
    assert restarted[0] == restarted[1] == restarted[3] == restarted[4] == 0
    assert restarted[2] > 0 and restarted[5] > 0


def test_codes_to_latent_equals_prefix_sums() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_stages=4, codebook_size=32, dim=6).train()
    for step in range(3):
        rq(clustered(300, 6, seed=step))
    rq.eval()
    x = clustered(2 * 7 * 7, 6, seed=9).reshape(2, 7, 7, 6)
    out = rq(x)
    for depth in range(1, 5):
        assert torch.equal(rq.codes_to_latent(out.codes, depth), out.prefix_sums[depth - 1])
        assert torch.equal(rq.codes_to_latent(out.codes[..., :depth]), out.prefix_sums[depth - 1])
    per_sample = rq.codes_to_latent(out.codes, torch.tensor([1, 3]))
    assert torch.equal(per_sample[0], out.prefix_sums[0, 0]) and torch.equal(per_sample[1], out.prefix_sums[2, 1])
    with pytest.raises(ValueError, match="depth"):
        rq.codes_to_latent(out.codes[..., :2], 3)
    with pytest.raises(ValueError, match="codes must lie"):
        rq.codes_to_latent(torch.full((2, 4), 32), 2)


def test_straight_through_value_and_gradient() -> None:
    rq = ResidualQuantizer(num_stages=3, codebook_size=8, dim=4).eval()
    x = torch.randn(2, 3, 3, 4, requires_grad=True)
    out = rq(x)
    y = rq.straight_through(x, out.prefix_sums, 2)
    assert torch.allclose(y, out.prefix_sums[1])
    weights = torch.randn_like(x)
    (y * weights).sum().backward()
    assert torch.allclose(x.grad, weights)  # identity gradient
    x.grad = None
    depth = torch.tensor([3, 1])
    z = rq.straight_through(x, out.prefix_sums, depth)
    assert torch.allclose(z[0], out.prefix_sums[2, 0]) and torch.allclose(z[1], out.prefix_sums[0, 1])
    z.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="depth"):
        rq.straight_through(x, out.prefix_sums, 0)
    with pytest.raises(ValueError, match="per-sample"):
        rq.straight_through(x, out.prefix_sums, torch.tensor([1, 2, 3]))


def test_commitment_loss_gradient_reaches_input() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4).eval()
    x = torch.randn(10, 4, requires_grad=True)
    out = rq(x)
    out.commitment_loss.backward()
    expected = sum(2 * (x.detach() - q) / x.numel() for q in out.prefix_sums) / 2
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_codebook_stats() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=4, dim=2, dead_threshold=1.0)
    set_state(rq, torch.randn(2, 4, 2), torch.tensor([[2.0, 2.0, 2.0, 2.0], [3.0, 0.5, 0.0, 1.0]]))
    stats = rq.codebook_stats()
    assert stats["usage"].tolist() == [1.0, 0.5]
    assert stats["dead_codes"].tolist() == [0, 2]
    assert stats["perplexity"][0] == pytest.approx(4.0)
    p = torch.tensor([3.0, 0.5, 1.0]) / 4.5
    assert stats["perplexity"][1] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    rq.eval()(torch.cat([rq.embed[0, :2], rq.embed[0, :2]]))
    assert rq.codebook_stats()["batch_usage"][0] == pytest.approx(0.5)


def test_empty_batch_and_bad_input() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4).train()
    rq(torch.randn(20, 4))
    out = rq(torch.empty(0, 3, 4))
    assert out.codes.shape == (0, 3, 2) and out.prefix_sums.shape == (2, 0, 3, 4)
    assert float(out.commitment_loss) == 0.0
    with pytest.raises(ValueError, match="shape"):
        rq(torch.randn(5, 3))
    fresh = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4).train()
    with pytest.raises(ValueError, match="empty"):
        fresh(torch.empty(0, 4))
    with pytest.raises(ValueError, match="positive"):
        ResidualQuantizer(num_stages=0, codebook_size=8, dim=4)
    with pytest.raises(ValueError, match="search_precision"):
        ResidualQuantizer(num_stages=1, codebook_size=8, dim=4, search_precision="fp16")


def test_state_dict_round_trip_keeps_initialisation() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4).train()
    rq(torch.randn(40, 4))
    state = rq.state_dict()
    assert set(state) == {"embed", "cluster_size", "embed_sum", "initted", "step"}
    loaded = ResidualQuantizer(num_stages=2, codebook_size=8, dim=4)
    loaded.load_state_dict(state)
    loaded.eval()
    x = torch.randn(30, 4)
    assert torch.equal(loaded(x).codes, rq.eval()(x).codes)
    embed = loaded.embed.clone()
    loaded.train()(torch.randn(40, 4))  # continues the EMA, no re-initialisation
    assert int(loaded.step) == 2 and not torch.equal(loaded.embed, embed)


def test_inference_mode_and_thread_count() -> None:
    """The CPU chain runs on worker threads: caller's inference mode carries over, and torch's
    thread count is restored afterwards."""
    rq = ResidualQuantizer(num_stages=3, codebook_size=64, dim=8, chunk_size=100).eval()
    x = torch.randn(1000, 8)
    reference = rq(x)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        out = rq(x)
    assert torch.equal(out.codes, reference.codes) and torch.equal(out.prefix_sums, reference.prefix_sums)
    assert torch.get_num_threads() == threads


def test_bf16_autocast_searches_in_fp32() -> None:
    rq = ResidualQuantizer(num_stages=2, codebook_size=16, dim=4).eval()
    x = torch.randn(50, 4)
    reference = rq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rq(x)
    assert out.prefix_sums.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.codes, reference.codes)
    y = rq.straight_through(x.bfloat16(), out.prefix_sums, 1)
    assert y.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(num_stages=4, codebook_size=256, dim=8).cuda().train()
    for step in range(5):
        x = clustered(2048, 8, seed=step).cuda().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = rq(x)
        out.commitment_loss.backward()
        assert x.grad is not None and out.codes.device.type == "cuda"
    assert torch.all(out.residual_norms[1:] < out.residual_norms[:-1])
    cpu = ResidualQuantizer(num_stages=4, codebook_size=256, dim=8)
    cpu.load_state_dict({k: v.cpu() for k, v in rq.state_dict().items()})
    x = clustered(1000, 8, seed=50)
    same = (cpu.eval()(x).codes == rq.eval()(x.cuda()).codes.cpu()).float().mean()
    assert same > 0.99  # identical up to near-ties


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_data_parallel_keeps_codebooks_identical(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "tests" / "dist_quantizer_worker.py"), str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert set(rank0) == set(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    assert int(rank0["restarting.step"]) == int(rank0["steps"])
    assert int(rank0["restarts"]) > 0  # the restart path (rank 0's vectors, broadcast) ran
    # Counts were all-reduced: with decay 0.9 and no restarts the total EMA count is
    # K·0.9^t + N_global·(1 - 0.9^t), with N_global the tokens of both ranks.
    steps, tokens, size = int(rank0["steps"]), int(rank0["world_tokens"]), 16
    expected = size * 0.9**steps + tokens * (1 - 0.9**steps)
    assert torch.allclose(rank0["plain.cluster_size"].sum(-1), torch.full((2,), expected), rtol=1e-4)
