"""The tokenizer's public API: presets, shapes, depths, save/load, bad checkpoints."""
import json

import pytest
import torch

from evotok import EvoTok, EvoTokConfig, reference_config, small_config
from evotok.hub import CheckpointError


def tiny_config(**overrides) -> EvoTokConfig:
    base = dict(image_size=32, channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                mid_block_attention=False, num_stages=4, codebook_size=64, code_dim=8,
                pixel_depth=2, semantic_depth=4, semantic_layers=1, semantic_width=32,
                semantic_heads=2, teacher_dim=24)
    return EvoTokConfig(**{**base, **overrides})


@pytest.fixture
def tok():
    model = EvoTok(tiny_config())
    model.train()
    model(torch.rand(4, 3, 32, 32) * 2 - 1)  # initialise codebooks from data
    return model.eval()


def test_public_api_shapes(tok):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 8, 8, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < tok.config.codebook_size
    recon = tok.decode(codes, depth=2)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1
    feats = tok.semantic_features(codes, depth=4)
    assert feats.shape == (2, 64, 24)
    every = tok.decode_all_depths(codes)
    assert every.shape == (4, 2, 3, 32, 32)
    assert torch.allclose(every[1], recon, atol=1e-5)
    # encode + decode in batches, at the pixel depth unless told otherwise
    torch.testing.assert_close(tok.reconstruct(images, batch_size=1), tok.decode(codes), atol=1e-5, rtol=0)
    torch.testing.assert_close(tok.reconstruct(images, depth=2), recon, atol=1e-5, rtol=0)
    assert (tok.config.num_stages, tok.config.pixel_depth, tok.config.semantic_depth,
            tok.config.codebook_size) == (4, 2, 4, 64)


def test_encode_does_not_update_codebooks(tok):
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    for key, value in tok.quantizer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_training_forward_and_per_sample_depths():
    model = EvoTok(tiny_config())
    model.train()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(images, torch.tensor([1, 2, 3]))
    assert out.reconstruction.shape == images.shape
    assert out.semantic_features.shape == (3, 64, 24)
    assert out.codes.shape == (3, 8, 8, 4)
    assert out.commitment_loss.ndim == 0 and out.commitment_loss >= 0
    out.reconstruction.mean().backward()
    assert model.encoder.net.conv_in.weight.grad is not None  # straight-through reaches the encoder


def test_bad_inputs_are_named(tok):
    with pytest.raises(ValueError, match="expected images"):
        tok.encode(torch.rand(1, 3, 31, 32))
    codes = tok.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="depth"):
        tok.decode(codes, depth=5)
    with pytest.raises(ValueError, match="codes"):
        tok.decode(codes + tok.config.codebook_size)
    with pytest.raises(ValueError, match="pixel_depth"):
        tiny_config(pixel_depth=9)


def test_save_load_round_trip_is_exact(tok, tmp_path):
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = EvoTok.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == tok.config
    for (k, a), (_, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))


def test_corrupt_and_mismatched_checkpoints(tok, tmp_path):
    folder = tmp_path / "ckpt"
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        EvoTok.from_pretrained(folder)

    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["codebook_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape"):
        EvoTok.from_pretrained(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        EvoTok.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="cannot find checkpoint"):
        EvoTok.from_pretrained(tmp_path / "does-not-exist")


def test_sharded_and_bfloat16_checkpoints_load_back(tok, tmp_path):
    total = sum(t.numel() * t.element_size() for t in tok.state_dict().values())
    tok.save_pretrained(tmp_path / "shards", max_shard_size=total // 3)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "shards" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(tok.state_dict())
    loaded = EvoTok.from_pretrained(tmp_path / "shards")
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), loaded.state_dict().values()))

    tok.save_pretrained(tmp_path / "one", max_shard_size="10GB")  # fits one file: no index
    assert sorted(p.name for p in (tmp_path / "one").glob("model*")) == ["model.safetensors"]

    tok.save_pretrained(tmp_path / "half", dtype=torch.bfloat16)
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert size < 0.6 * (tmp_path / "one" / "model.safetensors").stat().st_size
    half = EvoTok.from_pretrained(tmp_path / "half")
    for name, a in tok.state_dict().items():
        b = half.state_dict()[name]
        assert b.dtype == a.dtype  # cast back to the model's own dtype
        assert torch.equal(b, a.to(torch.bfloat16).to(a.dtype) if a.is_floating_point() else a), name

    (tmp_path / "shards" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="names the shard"):
        EvoTok.from_pretrained(tmp_path / "shards")
    (tmp_path / "shards" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        EvoTok.from_pretrained(tmp_path / "shards")
    (tmp_path / "shards" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        EvoTok.from_pretrained(tmp_path / "shards")


def test_small_preset_builds_and_runs():
    model = EvoTok(small_config()).eval()
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    model.train()
    model(images)
    model.eval()
    codes = model.encode(images)
    assert codes.shape == (1, 8, 8, 8)
    assert model.decode(codes).shape == (1, 3, 64, 64)
    assert model.semantic_features(codes).shape == (1, 64, 128)


def test_reference_preset_builds_offline_from_tiny_siglip(tmp_path):
    """The full-scale code path with a SigLIP-shaped vision model that is tiny and random."""
    from transformers import SiglipConfig, SiglipModel

    hf = SiglipConfig(
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
    )
    SiglipModel(hf).save_pretrained(tmp_path / "siglip")
    config = reference_config(str(tmp_path / "siglip"), image_size=64, codebook_size=256,
                              channels=(16, 16, 32, 32, 32), norm_num_groups=8, semantic_width=32,
                              semantic_heads=2, teacher_dim=32)
    assert (config.num_stages, config.code_dim, config.pixel_depth, config.semantic_depth) == (16, 32, 4, 16)
    model = EvoTok(config, load_pretrained_encoder=True)
    model.train()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model(images)
    assert out.codes.shape == (2, 4, 4, 16)
    assert out.semantic_features.shape == (2, 16, 32)
    model.save_pretrained(tmp_path / "evotok")
    loaded = EvoTok.from_pretrained(tmp_path / "evotok")  # rebuilt from the stored config, no download
    assert torch.equal(loaded.encode(images), model.eval().encode(images))
