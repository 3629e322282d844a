"""GaussianCLIP: a tiny random CLIP saved to a folder and loaded through ``from_pretrained`` (the path a
pretrained one takes), the token path against the tower's own, padding, and the stages' trainable parts."""

import math

import pytest
import torch
import transformers  # the extra gvit[vl], part of gvit[test]; conftest sets HF_HUB_OFFLINE=1

from gvit.gaussians import Gaussians, pad
from gvit.models.gaussian_clip import GaussianCLIP
from gvit.models.splat_stem import SplatStem


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    return folder


def _sets(b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.rand(b, k, 2, generator=g) * 2 - 1, 0.05 + 0.2 * torch.rand(b, k, 2, generator=g),
                     torch.rand(b, k, generator=g) * math.pi, torch.rand(b, k, 3, generator=g),
                     torch.ones(b, k))


def test_token_path_reproduces_the_towers_own_image_features(clip_dir):
    model = GaussianCLIP.from_pretrained(clip_dir, num_tokens=4, width=16, depth=1, heads=2).eval()
    pixels = torch.randn(2, 3, 16, 16)
    emb = model.clip.vision_model.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding.weight[1:]
    with torch.no_grad():
        reference = model.clip.get_image_features(pixel_values=pixels)
        reference = reference if torch.is_tensor(reference) else reference.pooler_output
        torch.testing.assert_close(model.embed_tokens(patches), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.rgb_embeddings(pixels), reference, atol=1e-5, rtol=1e-5)


def test_gaussian_embeddings_have_the_projection_width_and_ignore_padding(clip_dir):
    model = GaussianCLIP.from_pretrained(clip_dir, mode="sum", num_tokens=5, width=16, depth=2, heads=2).eval()
    g = _sets(3, 20)
    with torch.no_grad():
        out = model.image_embeddings(g)
        assert out.shape == (3, 16)
        torch.testing.assert_close(model.image_embeddings(pad(g, 31)), out, atol=1e-5, rtol=1e-5)
        text = model.text_embeddings(torch.randint(0, 64, (3, 7)), torch.ones(3, 7, dtype=torch.long))
    assert text.shape == (3, 16)


def test_stages_unfreeze_what_the_paper_trains(clip_dir):
    model = GaussianCLIP.from_pretrained(clip_dir, num_tokens=4, width=16, depth=1, heads=2)
    names = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    total = sum(p.numel() for p in model.parameters())

    fractions = model.set_stage("distill")
    assert names() == {f"stem.{n}" for n, _ in model.stem.named_parameters()}
    assert fractions["trainable"] == pytest.approx(sum(p.numel() for p in model.stem.parameters()) / total)

    model.set_stage("align")
    trained = names()
    assert any(n.startswith("clip.vision_model.encoder.layers.1.") for n in trained)
    assert not any(n.startswith("clip.vision_model.encoder.layers.2.") for n in trained)
    assert {"clip.visual_projection.weight", "clip.vision_model.post_layernorm.weight"} <= trained
    assert not any(n.startswith("clip.text_model") or n.startswith("clip.vision_model.embeddings") for n in trained)

    align_text = model.set_stage("align_text")
    trained = names()
    assert any(n.startswith("clip.text_model.encoder.layers.2.") for n in trained)
    assert not any(n.startswith("clip.text_model.encoder.layers.1.") for n in trained)
    assert {"clip.text_projection.weight", "clip.text_model.final_layer_norm.weight"} <= trained
    assert align_text["trainable"] == pytest.approx(
        sum(p.numel() for p in model.parameters() if p.requires_grad) / total)
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("finetune")


def test_a_stem_of_the_wrong_width_is_refused(clip_dir):
    clip = GaussianCLIP.from_pretrained(clip_dir, num_tokens=4, width=16, depth=1, heads=2).clip
    with pytest.raises(ValueError, match="32 wide"):
        GaussianCLIP(clip, SplatStem(24, num_tokens=4, width=16, depth=1, heads=2))
