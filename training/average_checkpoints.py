"""Average the weights of checkpoints of one model (a "model soup" of runs that share a start).

    python training/average_checkpoints.py runs/a/final runs/b/final --out runs/ab_average
    python training/average_checkpoints.py runs/a/final runs/b/final --weights 0.7 0.3 --out runs/ab_73

Works on any EvoTok checkpoint folder (``config.json``, ``model.safetensors`` or shards, and
files beside them such as the multimodal model's text tokenizer). The inputs must agree on
everything but the floating-point weights: the same config, the same tensor names, shapes and
dtypes, the same integer tensors and the same side files; otherwise the average means nothing
and the tool stops with what differs. One exception: the text tokenizer's corpus word counts
(``corpus_words.json``) grow with every stage, so they may differ and the average keeps, for
every word, its largest count (a word any input was trained on stays known). The output is
written atomically, with the config and side files of the first input and an
``averaged_from.json`` naming the inputs and their weights.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.hub import CONFIG_NAME, INDEX_NAME, CheckpointError, atomic_write_dir, read_weights, \
    write_weights
from evotok.mllm.text_tokenizer import WORDS_FILE

RECORD_NAME = "averaged_from.json"


def _side_files(folder: Path) -> list[Path]:
    """Every file but the top level's config, record and weights (one file or shards), relative to ``folder``."""
    def averaged_or_rewritten(rel: Path) -> bool:
        return rel.parent == Path(".") and (rel.name in {CONFIG_NAME, RECORD_NAME, INDEX_NAME}
                                            or rel.suffix == ".safetensors")

    return sorted(rel for rel in (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
                  if not averaged_or_rewritten(rel))


def _check_alike(first: Path, other: Path) -> None:
    config_a, config_b = (json.loads((f / CONFIG_NAME).read_text()) for f in (first, other))
    if config_a != config_b:
        keys = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k) != config_b.get(k))
        raise CheckpointError(f"{other} has another config than {first} (differs in {keys}); only runs of "
                              "one model can be averaged")
    files_a, files_b = _side_files(first), _side_files(other)
    if files_a != files_b:
        raise CheckpointError(f"{other} and {first} hold different files: {sorted(set(files_a) ^ set(files_b))}")
    changed = [str(p) for p in files_a if p.name != WORDS_FILE and not filecmp.cmp(first / p, other / p, shallow=False)]
    if changed:
        raise CheckpointError(f"{other} and {first} differ in {changed}: their tokenizers or cards must match")


def _merged_word_counts(paths: list[Path]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for path in paths:
        for word, count in json.loads(path.read_text()).items():
            merged[word] = max(count, merged.get(word, 0))
    return dict(sorted(merged.items()))


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float],
                   names: list[str]) -> dict[str, torch.Tensor]:
    """Weighted mean of floating-point tensors (accumulated in fp64); other tensors must be equal."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(first):
            diff = sorted(set(state) ^ set(first))
            raise CheckpointError(f"{name} and {names[0]} hold different tensors: {diff[:8]}")
        bad = [k for k in first if state[k].shape != first[k].shape or state[k].dtype != first[k].dtype]
        if bad:
            raise CheckpointError(f"{name} and {names[0]} differ in shape or dtype at {bad[:8]}")
    out = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = sum(w * s[key].to(torch.float64) for w, s in zip(weights, states))
            out[key] = total.to(tensor.dtype).contiguous()
        else:
            if any(not torch.equal(s[key], tensor) for s in states[1:]):
                raise CheckpointError(f"the integer tensor {key} differs between the checkpoints")
            out[key] = tensor
    return out


def average_checkpoints(folders: list[str | Path], out: str | Path,
                        weights: list[float] | None = None) -> Path:
    """Write the weighted average of ``folders`` (equal weights by default) to ``out``."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError("give at least two checkpoints to average")
    weights = [1.0 / len(folders)] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weights for {len(folders)} checkpoints")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
    out = Path(out)
    if out.resolve() in {f.resolve() for f in folders}:
        raise ValueError(f"{out} is one of the inputs; write the average elsewhere")
    for folder in folders:
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"{folder} is not a checkpoint folder (no {CONFIG_NAME})")
    for other in folders[1:]:
        _check_alike(folders[0], other)
    states = [read_weights(f)[0] for f in folders]
    averaged = average_states(states, weights, [str(f) for f in folders])

    def write(tmp: Path) -> None:
        shutil.copy2(folders[0] / CONFIG_NAME, tmp / CONFIG_NAME)
        for rel in _side_files(folders[0]):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.name == WORDS_FILE:
                merged = _merged_word_counts([f / rel for f in folders])
                (tmp / rel).write_text(json.dumps(merged, indent=0))
            else:
                shutil.copy2(folders[0] / rel, tmp / rel)
        write_weights(averaged, tmp)
        record = [{"checkpoint": str(f), "weight": w} for f, w in zip(folders, weights)]
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2))

    atomic_write_dir(out, write)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders of one model")
    parser.add_argument("--out", required=True, help="folder for the averaged checkpoint")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one per checkpoint, summing to 1")
    args = parser.parse_args(argv)
    out = average_checkpoints(args.checkpoints, args.out, args.weights)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
