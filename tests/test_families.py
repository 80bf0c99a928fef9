"""The model-family contract: the checks every family passes, in the style of diffusers'
``PipelineTesterMixin``. :class:`FamilyContract` holds the checks; each family's test class
inherits them and supplies a tiny local model (loaded through the family's real loader), its
parameter names and the library's own preprocessing and forward, for references that do not go
through slug_pl.

Checked: loading, inputs and shapes; which tensors belong to which tower and which are ranked;
cached (staged) evaluation equal to full evaluation; bit-exact edits; activation checkpointing
(same gradients, really recomputed); and the gradient pass's forget and retain gradients against
a direct computation on the model.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from lightning.pytorch import Trainer
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from slug_pl.data.datamodule import SlugDataModule
from slug_pl.data.labelled import LoadedSet
from slug_pl.data.mining import main as mine_main
from slug_pl.edit import apply_edit, make_edit, revert_edit, stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families import HfClip, OpenClip
from slug_pl.methods.slug import SlugModule

EDITS = ["vision early", "vision late", "vision head", "text early", "text late", "text head"]
TEXTS = ["a photo of Alice Moreau.", "A Close-up  photo of the   BICYCLE!", "it's 3 o'clock, isn't it?",
         "a very long caption that runs on and on past the end of the tiny context window"]
START, END = 49406, 49407


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on shared cores two threads spin against other jobs (measured here: an
    evaluation 40x slower with 2 threads than with 1 under a load of 9)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photos() -> list[Image.Image]:
    """Two real 640x427 photos shipped with scikit-learn, and a crop of each (portrait shape)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    return photos + [p.crop((100, 20, 300, 400)) for p in photos]


def _read_pairs(urls: list[str]) -> tuple[list[Image.Image], list[str]]:
    """Every (image, caption) of webdataset shards, in order, read with webdataset and PIL only."""
    images, captions = [], []
    for url in urls:
        for sample in wds.WebDataset(url, shardshuffle=False):
            images.append(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            captions.append(sample["txt"].decode("utf-8").strip())
    return images, captions


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's ``.grad`` (zeros where backward did not reach it, e.g. the logit scale
    under the forget loss)."""
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def _assert_grads_close(actual: dict, expected: dict, what: str) -> None:
    """Equal to 1e-5 relative, above a float32 noise floor of 1e-6 × the largest gradient entry
    (tensors whose exact gradient is 0, such as attention key biases, hold only rounding noise)."""
    assert actual.keys() == expected.keys(), what
    floor = 1e-6 * max(g.abs().max().item() for g in expected.values())
    for name, ref in expected.items():
        torch.testing.assert_close(actual[name], ref, rtol=1e-5, atol=floor, msg=lambda m, n=name: f"{what}: {n}: {m}")


class FamilyContract:
    """Checks every :class:`~slug_pl.families.base.ModelFamily` passes. A subclass provides:

    - fixtures ``family`` (loading the tiny local model) and ``saved_weights`` (the file's tensors);
    - ``LOGIT_SCALE``, ``NEVER_RANKED`` (the tensors besides biases that are never ranked),
      ``MUST_RANK`` (block weights, projections, LayerNorm gains), ``EDITED`` (a parameter per
      entry of :data:`EDITS`), ``EMBED_DIM``;
    - fixtures ``family_kwargs`` (its init arguments) and ``reference_inputs`` (the library's own
      image preprocessing and tokenizer, not slug_pl's);
    - ``blocks(model)`` (the transformer blocks of both towers) and ``reference_features(model,
      images, tokens)`` (the library's own forward, unnormalized embeddings).
    """

    LOGIT_SCALE: str
    NEVER_RANKED: set[str]
    MUST_RANK: list[str]
    EDITED: dict[str, str]
    EMBED_DIM: int

    # -- fixtures ---------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, family):
        return family.load()

    @pytest.fixture(scope="class")
    @classmethod
    def mined_forget(cls, tmp_path_factory, small_world) -> tuple[str, str]:
        """(concept, forget shard): the first identity's pairs, mined from the corpus by name."""
        concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
        out = tmp_path_factory.mktemp("forget") / "forget"
        assert mine_main(["--shards", small_world["corpus"], "--name", concept, "--out", str(out)]) == 0
        return concept, str(out / "forget-000000.tar")

    @pytest.fixture(scope="class")
    @classmethod
    def pass_result(cls, family, small_world, mined_forget, tmp_path_factory) -> SlugModule:
        """The gradient pass (Trainer + SlugModule, one epoch, no search) over the forget pairs and
        the whole corpus as retain set in global batches of 16 (the last one holds 8)."""
        concept, forget = mined_forget
        module = SlugModule(family)
        data = SlugDataModule(forget=forget, retain=small_world["corpus"], concepts=[concept],
                              batch_size=3, retain_batch_size=16)
        trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          use_distributed_sampler=False, default_root_dir=tmp_path_factory.mktemp("pass"))
        trainer.fit(module, datamodule=data)
        return module

    # -- loading and inputs -----------------------------------------------------------------------
    def test_loads_the_saved_weights_through_the_real_loader(self, model, saved_weights):
        assert not model.training
        state = model.state_dict()
        params = dict(model.named_parameters())
        assert set(params) <= set(saved_weights) <= set(state)
        for name, tensor in saved_weights.items():
            assert torch.equal(state[name], tensor), name
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())

    def test_tokenize_gives_open_clip_ids_up_to_the_end_token(self, family):
        from open_clip.tokenizer import SimpleTokenizer

        tokens = family.tokenize(TEXTS)
        assert tokens.shape == (len(TEXTS), 16) and tokens.dtype == torch.long
        reference = SimpleTokenizer()(TEXTS, context_length=16)  # open_clip's own BPE, pads with 0
        for row, ref in zip(tokens, reference):
            end = int((ref == END).nonzero()[0])
            assert row[0] == START and torch.equal(row[: end + 1], ref[: end + 1])
        assert int((tokens[-1] == END).nonzero()[0]) == 15  # truncated: the end token is kept

    def test_text_embedding_ignores_what_follows_the_end_token(self, family, model):
        tokens = family.tokenize(TEXTS[:3])
        other = tokens.clone()
        for row in other:
            end = int((row == END).nonzero()[0])
            row[end + 1:] = torch.arange(1, 16 - end) * 7  # arbitrary ids after the end token
        with torch.no_grad():
            assert torch.equal(family.encode_text(model, tokens), family.encode_text(model, other))

    def test_image_transform_is_deterministic_and_sized_for_the_model(self, family):
        transform = family.image_transform()
        for photo in _photos():
            x = transform(photo)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert torch.equal(x, transform(photo))

    def test_normalization_override_and_record(self, family, family_kwargs):
        own = family.image_normalization()
        assert family.describe()["image_mean"] == own["image_mean"]
        assert family.describe()["image_std"] == own["image_std"]
        mean, std = [0.5, 0.25, 0.75], [0.2, 0.4, 0.6]
        other = type(family)(**family_kwargs, image_mean=mean, image_std=std)
        assert other.describe()["image_mean"] == mean and other.describe()["image_std"] == std
        photo = _photos()[0]
        pixels = family.image_transform()(photo) * torch.tensor(own["image_std"]).view(3, 1, 1) \
            + torch.tensor(own["image_mean"]).view(3, 1, 1)  # back to [0, 1]
        expected = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(other.image_transform()(photo), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="image_std must be three positive numbers"):
            type(family)(**family_kwargs, image_std=[0.5, 0.0, 0.5])

    def test_encoders_give_unnormalized_embeddings_and_the_exponentiated_scale(self, family, model):
        with torch.no_grad():
            u = family.encode_image(model, torch.randn(5, 3, 32, 32))
            v = family.encode_text(model, family.tokenize(TEXTS))
        assert u.shape == (5, self.EMBED_DIM) and v.shape == (len(TEXTS), self.EMBED_DIM)
        assert not torch.allclose(u.norm(dim=-1), torch.ones(5))
        scale = family.logit_scale(model)
        assert scale.ndim == 0 and scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial scale

    # -- structure --------------------------------------------------------------------------------
    def test_every_parameter_but_the_logit_scale_belongs_to_a_tower(self, family, model):
        towers = {n: family.tower_of(n) for n, _ in model.named_parameters()}
        assert [n for n, t in towers.items() if t is None] == [self.LOGIT_SCALE]
        assert {"vision", "text"} == {t for t in towers.values() if t is not None}
        for which, name in self.EDITED.items():
            assert towers[name] == which.split()[0], name

    def test_rankable_tensors_exclude_biases_embeddings_and_the_scale(self, family, model):
        params = dict(model.named_parameters())
        assert self.NEVER_RANKED <= set(params)
        never = {n for n in params if n.endswith("bias")} | self.NEVER_RANKED
        rankable = {n for n, p in params.items() if family.is_rankable(n, p)}
        assert rankable == set(params) - never
        assert set(self.MUST_RANK) <= rankable

    @pytest.mark.parametrize("which", EDITS)
    def test_cached_evaluation_equals_full_evaluation(self, family, model, which):
        layer = self.EDITED[which]
        torch.manual_seed(0)
        classes = [f"person {i}" for i in range(6)]
        concepts = LoadedSet("concepts", torch.randn(11, 3, 32, 32), torch.arange(11) % 6, classes,
                             ["a photo of {}.", "{} smiling."])
        utility = LoadedSet("utility", torch.randn(7, 3, 32, 32), torch.arange(7) % 3, ["cat", "dog", "car"],
                            ["a photo of a {}."])
        cached = Evaluator(family, concepts, ["person 0"], utility, batch_size=4)
        cached.evaluate(model)  # fills the caches from the unedited model
        grad = torch.randn_like(dict(model.named_parameters())[layer])
        for step in (0.05, 0.3):  # the second step re-uses the cached hidden states
            with stepped(model, layer, grad, step):
                for name in ("concepts", "utility"):
                    fast = cached.logits(model, name, edited=layer)
                    full = Evaluator(family, concepts, ["person 0"], utility, batch_size=4).logits(model, name)
                    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
                    assert (full - cached.logits(model, name)).abs().max() > 1e-4  # the edit matters
        tower = family.tower_of(layer)
        stages = family.tower_stages(model, tower)
        start = stages.first_block(layer)
        assert start == {"early": 0, "late": len(stages.blocks) - 1, "head": len(stages.blocks)}[which.split()[1]]
        if start > 0:
            assert any(k[1:] == (tower, start) for k in cached._hidden), "no hidden states were cached"

    def test_apply_and_revert_are_bit_exact(self, family, model):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        name = self.EDITED["text late"]
        edit = make_edit(model, name, torch.randn_like(before[name]), 0.1)
        apply_edit(model, edit)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == [name]
        revert_edit(model, edit)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def test_activation_checkpointing_recomputes_and_keeps_the_gradients(self, family):
        images, tokens = torch.randn(3, 3, 32, 32), family.tokenize(TEXTS[:3])
        results = {}
        for checkpointed in (False, True):
            model = family.load()
            if checkpointed:
                family.enable_activation_checkpointing(model)
            calls = [0] * len(self.blocks(model))
            for i, block in enumerate(self.blocks(model)):  # pre-hooks: a recompute may stop early
                block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
            u, v = family.encode_image(model, images), family.encode_text(model, tokens)
            F.cosine_similarity(u, v).mean().backward()
            results[checkpointed] = _grads(model), calls
        (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
        assert plain_calls == [1] * len(plain_calls)
        assert checkpointed_calls == [2] * len(plain_calls)  # forward, then again in backward
        _assert_grads_close(checkpointed, plain, "checkpointed vs plain")

    # -- the gradient pass ------------------------------------------------------------------------
    def test_pass_gradients_equal_a_direct_computation(self, family, pass_result, mined_forget, small_world,
                                                       reference_inputs):
        """Forget: ∇ mean_i cos(u_i, v_i) over the mined pairs. Retain: ∇ of the mean over global
        batches [16k, 16k + 16) of the corpus of the symmetric cross-entropy of
        ``exp(logit_scale) · û v̂ᵀ``. Both from the library's own preprocessing and forward."""
        transform, tokenize = reference_inputs
        model = family.load()
        assert pass_result.pass_stats["forget"]["samples"] == 4
        images, captions = _read_pairs([mined_forget[1]])
        u, v = self.reference_features(model, torch.stack([transform(i) for i in images]), tokenize(captions))
        F.cosine_similarity(u, v, dim=-1).mean().backward()
        _assert_grads_close(pass_result.gradients["forget"], _grads(model), "forget")

        model.zero_grad(set_to_none=True)
        images, captions = _read_pairs(small_world["corpus_shards"])
        batches = [slice(k, k + 16) for k in range(0, len(images), 16)]
        assert len(batches) == pass_result.pass_stats["retain"]["batches"] == 8
        for b in batches:
            u, v = self.reference_features(model, torch.stack([transform(i) for i in images[b]]),
                                           tokenize(captions[b]))
            logits = model.logit_scale.exp() * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
            target = torch.arange(len(logits))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            (loss / len(batches)).backward()
        _assert_grads_close(pass_result.gradients["retain"], _grads(model), "retain")


class TestOpenClip(FamilyContract):
    LOGIT_SCALE = "logit_scale"
    NEVER_RANKED = {"logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                    "visual.positional_embedding", "visual.conv1.weight"}
    MUST_RANK = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_fc.weight",
                 "visual.ln_pre.weight", "visual.ln_post.weight", "visual.proj", "transformer.resblocks.0.ln_1.weight",
                 "transformer.resblocks.1.attn.out_proj.weight", "ln_final.weight", "text_projection"]
    EDITED = {
        "vision early": "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "vision late": "visual.transformer.resblocks.1.attn.in_proj_weight",
        "vision head": "visual.proj",
        "text early": "transformer.resblocks.0.attn.out_proj.weight",
        "text late": "transformer.resblocks.1.mlp.c_proj.weight",
        "text head": "ln_final.weight",
    }
    EMBED_DIM = 32

    @pytest.fixture(scope="class")
    @classmethod
    def family_kwargs(cls, tiny_checkpoint):
        return {"model_name": "slug-tiny-vit", "pretrained": tiny_checkpoint}

    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, family_kwargs):
        return OpenClip(**family_kwargs)

    @pytest.fixture(scope="class")
    @classmethod
    def saved_weights(cls, tiny_checkpoint):
        return load_file(tiny_checkpoint)

    @staticmethod
    def blocks(model):
        return list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)

    @pytest.fixture(scope="class")
    @classmethod
    def reference_inputs(cls):
        import open_clip

        _, _, preprocess = open_clip.create_model_and_transforms("slug-tiny-vit")
        return preprocess, open_clip.get_tokenizer("slug-tiny-vit")

    @staticmethod
    def reference_features(model, images, tokens):
        return model.encode_image(images), model.encode_text(tokens)


class TestHfClip(FamilyContract):
    LOGIT_SCALE = "logit_scale"
    NEVER_RANKED = {"logit_scale", "text_model.embeddings.token_embedding.weight",
                    "text_model.embeddings.position_embedding.weight", "vision_model.embeddings.class_embedding",
                    "vision_model.embeddings.patch_embedding.weight",
                    "vision_model.embeddings.position_embedding.weight"}
    MUST_RANK = ["vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.1.mlp.fc1.weight",
                 "vision_model.pre_layrnorm.weight", "vision_model.post_layernorm.weight", "visual_projection.weight",
                 "text_model.encoder.layers.0.layer_norm1.weight", "text_model.encoder.layers.1.self_attn.out_proj.weight",
                 "text_model.final_layer_norm.weight", "text_projection.weight"]
    EDITED = {
        "vision early": "vision_model.encoder.layers.0.mlp.fc1.weight",
        "vision late": "vision_model.encoder.layers.1.self_attn.v_proj.weight",
        "vision head": "vision_model.post_layernorm.weight",
        "text early": "text_model.encoder.layers.0.self_attn.out_proj.weight",
        "text late": "text_model.encoder.layers.1.mlp.fc2.weight",
        "text head": "text_projection.weight",
    }
    EMBED_DIM = 32

    @pytest.fixture(scope="class")
    @classmethod
    def family_kwargs(cls, tiny_hf_clip):
        return {"model_name": tiny_hf_clip}

    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, family_kwargs):
        return HfClip(**family_kwargs)

    @pytest.fixture(scope="class")
    @classmethod
    def saved_weights(cls, tiny_hf_clip):
        return load_file(str(Path(tiny_hf_clip) / "model.safetensors"))

    @staticmethod
    def blocks(model):
        return list(model.vision_model.encoder.layers) + list(model.text_model.encoder.layers)

    @pytest.fixture(scope="class")
    @classmethod
    def reference_inputs(cls, tiny_hf_clip):
        from transformers import CLIPImageProcessor, CLIPTokenizer

        processor = CLIPImageProcessor.from_pretrained(tiny_hf_clip)
        tokenizer = CLIPTokenizer.from_pretrained(tiny_hf_clip)
        return (lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0],
                lambda texts: tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                                        return_tensors="pt")["input_ids"])

    @staticmethod
    def reference_features(model, images, tokens):
        return (model.get_image_features(pixel_values=images).pooler_output,
                model.get_text_features(input_ids=tokens).pooler_output)

    # -- Hugging Face specifics -------------------------------------------------------------------
    def test_folder_reloads_with_every_transformers_class(self, tiny_hf_clip, saved_weights):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        text = CLIPTextModel.from_pretrained(tiny_hf_clip)
        vision = CLIPVisionModel.from_pretrained(tiny_hf_clip)
        for tower, prefix in ((text, "text_model."), (vision, "vision_model.")):
            state = tower.state_dict()
            assert state and all(torch.equal(saved_weights[prefix + k], v) for k, v in state.items())
        assert isinstance(CLIPModel.from_pretrained(tiny_hf_clip), CLIPModel)
        assert len(CLIPTokenizer.from_pretrained(tiny_hf_clip)) == 49408
        assert CLIPImageProcessor.from_pretrained(tiny_hf_clip).crop_size == {"height": 32, "width": 32}

    def test_image_transform_equals_the_image_processor_on_real_photos(self, family, tiny_hf_clip):
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(tiny_hf_clip)
        photos = _photos()
        expected = processor(images=photos, return_tensors="pt")["pixel_values"]
        transform = family.image_transform()
        torch.testing.assert_close(torch.stack([transform(p) for p in photos]), expected, rtol=0, atol=1e-5)

    def test_the_folders_own_statistics_are_used(self, tiny_hf_clip, tmp_path):
        folder = tmp_path / "own_stats"
        shutil.copytree(tiny_hf_clip, folder)
        config = json.loads((folder / "preprocessor_config.json").read_text())
        config |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        family = HfClip(str(folder))
        assert family.describe()["image_mean"] == [0.5, 0.5, 0.5] == family.describe()["image_std"]
        white = Image.fromarray(np.full((40, 40, 3), 255, dtype=np.uint8))
        assert torch.allclose(family.image_transform()(white), torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5

    def test_missing_or_foreign_folders_are_refused_naming_them(self, tiny_hf_clip, tmp_path):
        with pytest.raises(FileNotFoundError, match="CLIP model folder not found: .*nowhere"):
            HfClip(str(tmp_path / "nowhere")).load()
        text_only = tmp_path / "text_only"
        from transformers import CLIPTextModel

        CLIPTextModel.from_pretrained(tiny_hf_clip).save_pretrained(text_only)
        with pytest.raises(ValueError, match=r"text_only holds a 'clip_text_model' model, not a CLIPModel"):
            HfClip(str(text_only)).load()
        weights_only = tmp_path / "weights_only"
        weights_only.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(tiny_hf_clip) / name, weights_only / name)
        with pytest.raises(FileNotFoundError, match="weights_only has no usable tokenizer"):
            HfClip(str(weights_only)).tokenize(["a"])
        with pytest.raises(FileNotFoundError, match=r"weights_only has no readable image processor"):
            HfClip(str(weights_only)).image_transform()
