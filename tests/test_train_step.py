"""The optimised tokenizer step (training/step.py): every switch keeps the plain step's losses.

The model is the reference preset's architecture at a tiny width (a random SigLIP-shaped
transformers encoder and teacher, a VGG16-shaped random perceptual net, PatchGAN active from the
first step), so the switches act on the same kinds of modules as at full scale.

``compile`` is the one switch whose numbers are not compared here: inductor needs minutes of two
CPU cores for these graphs (measured: ~5 min for the tiny benchmark), far over a test's budget.
Its effect on the losses is checked by ``training/bench_train_step.py``, which compares the
first two steps of every configuration with the plain step's (compile included).
"""
from __future__ import annotations

import copy
import traceback
import warnings
from dataclasses import replace

import pytest
import torch

from evotok.config import reference_config
from evotok.losses import FeatureDistance, LossWeights, PatchDiscriminator
from evotok.model import EvoTok
from evotok.teacher import HFVisionTeacher
from training import bench_train_step as bench
from training.step import (CHECKPOINT_TARGETS, DEFAULT_COMPILE, Optimizations, TokenizerTrainer,
                           freeze_unused_parameters, state_digests)

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
              image_size=32)
TOKENIZER = dict(image_size=32, channels=(8, 16, 16, 16), norm_num_groups=4, num_stages=4, codebook_size=32,
                 code_dim=8, pixel_depth=2, semantic_depth=4, semantic_layers=1, semantic_width=16,
                 semantic_heads=2, teacher_dim=32)
WEIGHTS = LossWeights(perceptual=1.0, gan=0.5, gan_start_step=0)
REL_TOL = 1e-4  # fp32 on CPU: only summation order may differ


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These steps are tiny: one thread is as fast as two and does not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = bench.write_siglip_folder(tmp_path_factory.mktemp("siglip") / "tiny", VISION)
    torch.manual_seed(0)
    model = EvoTok(reference_config(str(folder), **TOKENIZER), load_pretrained_encoder=True)
    return {"model": model, "teacher": HFVisionTeacher(folder),
            "perceptual": FeatureDistance(bench.VGG16Standin(16)), "discriminator": PatchDiscriminator(8, 2)}


@pytest.fixture(scope="module")
def batch():
    images = bench.fixed_batch(3, 32, seed=1)
    depths = torch.tensor([2, 1, 2])
    return images, depths


def make_trainer(template, opts: Optimizations) -> TokenizerTrainer:
    torch.manual_seed(0)
    return TokenizerTrainer(
        copy.deepcopy(template["model"]), weights=WEIGHTS, lr=1e-3, grad_clip=1.0,
        teacher=copy.deepcopy(template["teacher"]), perceptual=copy.deepcopy(template["perceptual"]),
        discriminator=copy.deepcopy(template["discriminator"]), optimizations=opts,
    )


def two_steps(trainer: TokenizerTrainer, batch) -> list[dict[str, float]]:
    images, depths = batch
    torch.manual_seed(0)  # codebook initialisation and restarts
    return [{k: float(v) for k, v in trainer.step(images, depths, step).items()} for step in range(2)]


@pytest.fixture(scope="module")
def plain_losses(template, batch):
    return two_steps(make_trainer(template, Optimizations.none()), batch)


def assert_same_losses(found: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    for step, (mine, ref) in enumerate(zip(found, expected)):
        assert mine.keys() == ref.keys()
        for key in ref:
            assert mine[key] == pytest.approx(ref[key], rel=REL_TOL, abs=1e-6), f"{key} at step {step + 1}"


SWITCHES = [name for name in Optimizations.switch_names() if name != "compile"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_gives_the_plain_steps_losses(template, batch, plain_losses, switch):
    """Steps 1 and 2 (after one Adam update of both networks) on a fixed batch."""
    losses = two_steps(make_trainer(template, Optimizations.only(switch)), batch)
    assert {"reconstruction", "perceptual", "gan", "semantic", "commitment", "discriminator"} <= losses[0].keys()
    assert losses[1]["total"] != losses[0]["total"]  # the update happened
    assert_same_losses(losses, plain_losses)


def test_all_switches_but_compile_together_give_the_plain_steps_losses(template, batch, plain_losses):
    opts = replace(Optimizations.all(), compile=())
    assert_same_losses(two_steps(make_trainer(template, opts), batch), plain_losses)


class _HostReads:
    """Records the Tensor methods that copy a value to the host (each a device sync on GPU):
    ``(method, direct caller, nearest project frame)``, files as ``folder/file.py:function``."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                stack = traceback.extract_stack()[:-1]
                project = next((f for f in reversed(stack) if "/evotok/" in f.filename or "/training/" in f.filename),
                               None)
                self.calls.append((_name, self._where(stack[-1]), self._where(project)))
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    @staticmethod
    def _where(frame) -> str:
        if frame is None:
            return "elsewhere"
        folder, file = frame.filename.rsplit("/", 2)[-2:]
        return f"{folder}/{file}:{frame.name}"

    def from_project(self) -> list[tuple[str, str]]:
        """Reads issued by project code (directly or through a library it calls)."""
        return [(name, project) for name, _, project in self.calls if project != "elsewhere"]


# evotok/teacher.py checks that images lie in [-1, 1] with `if images.abs().amax() > 1.5` on every
# call: one host read per step that the training step cannot avoid (reported to the module's owner).
KNOWN_OUTSIDE_READS = {("__bool__", "evotok/teacher.py:_prepare_images")}


def test_sync_free_step_reads_nothing_back_and_returns_tensors(template, batch, monkeypatch):
    trainer = make_trainer(template, Optimizations())
    images, depths = batch
    trainer.step(images, depths, 0)  # the first step initialises the codebooks (one read of a flag)
    reads = _HostReads(monkeypatch)
    terms = trainer.step(images, depths, 1)
    assert not [call for call in reads.from_project() if call not in KNOWN_OUTSIDE_READS]
    assert not [call for call in reads.calls if call[0] == "item"]
    assert terms and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())


def test_plain_step_reads_every_loss_term_back(template, batch, monkeypatch):
    trainer = make_trainer(template, Optimizations.none())
    images, depths = batch
    trainer.step(images, depths, 0)
    reads = _HostReads(monkeypatch)
    terms = trainer.step(images, depths, 1)
    assert all(isinstance(v, float) for v in terms.values())
    direct = [caller for name, caller, _ in reads.calls if name == "item" and caller.startswith("training/step.py")]
    assert len(direct) == len(terms)


def test_fused_adam_is_used_where_the_kernel_exists(template):
    trainer = make_trainer(template, Optimizations.only("fused_adam"))
    assert trainer.fused_adam_active and trainer.disc_optimizer.defaults["fused"]


def test_fused_adam_falls_back_with_a_warning_where_it_is_missing(template, batch, plain_losses, monkeypatch):
    real_adam = torch.optim.Adam

    class NoFusedAdam(real_adam):
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFusedAdam)
    with pytest.warns(RuntimeWarning, match="fused Adam is not available"):
        trainer = make_trainer(template, Optimizations.only("fused_adam"))
    assert not trainer.fused_adam_active
    assert any("foreach" in note for note in trainer.notes)
    assert_same_losses(two_steps(trainer, batch), plain_losses)


def test_layout_switches_reach_their_modules(template):
    trainer = make_trainer(template, replace(Optimizations.all(), compile=DEFAULT_COMPILE + ("pixel_decoder",)))
    decoder_convs = [m for m in trainer.model.pixel_decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert decoder_convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in decoder_convs)
    disc_convs = [m for m in trainer.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in disc_convs)
    # checkpointing: the HF encoder's layers and the diffusers decoder carry the flag and the function
    flagged = [m for m in trainer.model.encoder.modules() if getattr(m, "gradient_checkpointing", False)]
    assert flagged and all(callable(m._gradient_checkpointing_func) for m in flagged)
    assert trainer.model.pixel_decoder.net.gradient_checkpointing
    # compile is applied in place (lazily, on the first call): the state-dict keys do not change
    assert trainer.model.pixel_decoder._compiled_call_impl is not None
    assert trainer.model.encoder._compiled_call_impl is not None
    assert trainer.discriminator._compiled_call_impl is not None
    assert trainer.teacher.tower._compiled_call_impl is not None
    assert trainer.model.state_dict().keys() == template["model"].state_dict().keys()
    # frozen_nets_bf16 applies bf16 on CUDA only: on CPU the teacher keeps fp32 weights
    assert next(trainer.teacher.model.parameters()).dtype == torch.float32


def test_frozen_nets_bf16_runs_the_teacher_in_inference_mode_and_returns_a_normal_tensor(template, batch):
    trainer = make_trainer(template, Optimizations.only("frozen_nets_bf16"))
    features = trainer.teacher_features(batch[0])
    assert not features.is_inference() and not features.requires_grad
    assert torch.allclose(features, template["teacher"].image_features(batch[0]))


def test_the_encoders_unused_tail_is_frozen_once(template):
    model = copy.deepcopy(template["model"])
    frozen = freeze_unused_parameters(model)
    last = VISION["num_hidden_layers"] - 1
    assert frozen and all(name.startswith("encoder.backbone.") for name in frozen)
    assert any(f"layers.{last}." in name for name in frozen)
    assert not any(f"layers.{last - 1}." in name for name in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for p in model.parameters())
    assert freeze_unused_parameters(model) == []  # nothing left unused


def test_optimizations_from_a_config_mapping():
    opts = Optimizations.from_dict({"compile": True, "activation_checkpointing": ["pixel_decoder"], "sync_free": False})
    assert opts.compile == DEFAULT_COMPILE and opts.activation_checkpointing == ("pixel_decoder",)
    assert not opts.sync_free and opts.fused_adam  # unspecified keys keep their defaults
    assert Optimizations.from_dict({"activation_checkpointing": True}).activation_checkpointing == CHECKPOINT_TARGETS
    assert Optimizations.from_dict(None) == Optimizations()
    with pytest.raises(ValueError, match="unknown train.optimizations key"):
        Optimizations.from_dict({"fused_adamw": True})
    with pytest.raises(ValueError, match="unknown target"):
        Optimizations.from_dict({"compile": ["quantizer"]})
    with pytest.raises(ValueError, match="must be true or false"):
        Optimizations.from_dict({"channels_last": "yes"})
    with pytest.raises(ValueError, match="unknown optimisation"):
        Optimizations.only("turbo")
    assert Optimizations.none().describe() == "none"
    assert "channels_last" in Optimizations.only("channels_last").describe()


def test_state_digests_tell_identical_from_diverged_codebooks(template):
    a, b = copy.deepcopy(template["model"]), copy.deepcopy(template["model"])
    assert state_digests(a) == state_digests(b)
    b.quantizer.cluster_size[0, 0] += 1
    assert state_digests(a)["quantizer_buffers"] != state_digests(b)["quantizer_buffers"]
    assert state_digests(a)["parameters"] == state_digests(b)["parameters"]


def test_training_script_takes_the_switches_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from training.train_tokenizer import main

    switches = ["train.optimizations.channels_last=true", "train.optimizations.activation_checkpointing=true",
                "train.optimizations.fused_adam=true", "train.eval_every=100", "loss.gan_start_step=1"]

    def run(out, steps, resume=False):
        argv = ["--config", "training/configs/tokenizer_tiny_test.yaml", "--set", f"train.output_dir={out}",
                f"train.steps={steps}", "train.save_every=1", *switches]
        return main(argv + (["--resume"] if resume else []))

    summary = run(tmp_path / "straight", 2)
    assert summary["optimizations"]["channels_last"] and summary["optimizations"]["activation_checkpointing"]
    assert len(summary["rank_digests"]) == 1
    run(tmp_path / "split", 1)                # interrupted after step 1 (the GAN starts at step 1)
    run(tmp_path / "split", 2, resume=True)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown train.optimizations key"):
        main(["--config", "training/configs/tokenizer_tiny_test.yaml", "--set", f"train.output_dir={tmp_path / 'bad'}",
              "train.optimizations.warp_speed=true"])


def test_benchmark_refuses_the_reference_shapes_on_cpu():
    with pytest.raises(SystemExit, match="--tiny"):
        bench.main(["--device", "cpu"])


def test_benchmark_tiny_run_prints_a_table_with_matching_losses(tmp_path, capsys, monkeypatch):
    # the test template's shapes (32 px) instead of the CLI's tiny width (64 px): same code, less time
    monkeypatch.setattr(bench, "TINY", replace(bench.TINY, vision=VISION, discriminator=(8, 2), vgg_divisor=16,
                                               tokenizer=TOKENIZER))
    out = tmp_path / "table.md"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = bench.main(["--device", "cpu", "--tiny", "--batch-sizes", "2", "--steps", "1", "--warmup", "1",
                           "--only", "lean_gan", "--output", str(out)])
    assert [r.label for r in rows] == ["baseline (plain step)", "lean_gan"]
    assert rows[1].max_rel_diff is not None and rows[1].max_rel_diff <= bench.TOLERANCE["cpu"]
    assert all(r.images_per_s > 0 and r.seconds_per_step > 0 for r in rows)
    text = out.read_text()
    assert "TINY CPU width" in text and "| lean_gan | 2 |" in text and "not measured" in text
    assert text.strip() in capsys.readouterr().out
