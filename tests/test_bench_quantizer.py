"""training/bench_quantizer.py: the precision table counts truly farther picks, not broken ties."""
from __future__ import annotations

import argparse

import torch

from training.bench_quantizer import compare_picks, precision_effect


def test_a_pick_of_a_duplicate_code_is_a_tie_and_a_farther_code_is_counted():
    codebook = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])  # codes 0 and 1 are the same point
    x = torch.tensor([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]])
    reference = torch.tensor([0, 0, 0])
    farther, tie = compare_picks(x, codebook, torch.tensor([0, 1, 2]), reference)
    assert farther.tolist() == [False, False, True]
    assert tie.tolist() == [False, True, False]


def test_precision_table_has_a_row_per_faster_precision(capsys):
    precision_effect(torch.randn(256, 8), argparse.Namespace(stages=2, codebook_size=64, dim=8))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tf32") or line.startswith("| bf16")]
    assert [row.split(" | ")[0] for row in rows] == ["| tf32", "| tf32x3", "| bf16"]
    for row in rows:
        farther = int(row.split(" | ")[1].split(" / ")[0])
        assert 0 <= farther <= 256
