"""CAM sources on the tiny random CLIP: batched GradCAM vs the reference loop, ExCEL SVC maps, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_cam.cams import CAM_SOURCES, CamOutput, attention_without_cls, build_cam_source, minmax_scale
from stage1_cam.cams.attributes import build_attribute_bank, load_attribute_bank
from stage1_cam.cams.excel import ExcelSVC, enrich_text, feature_surgery, minmax_over_tokens
from stage1_cam.cams.gradcam import ClipESGradCAM, gradcam_from_weights, gradcam_scale
from stage1_cam.models.clip_backbone import FrozenClipBackbone
from stage1_cam.models.text import build_dataset_text_embeddings, get_tokenizer
from tests.numerics import assert_close_f32, vit_block_terms

#: Roundings in one GradCAM value: the last block forward and backward, the 64-long act . grad, the token mean.
GRADCAM_TERMS = 2 * vit_block_terms(64, 25) + 64 + 24
#: Roundings in a head-averaged attention map of the 12-block pass (each block evaluated in another order).
ATTN_TERMS = 12 * vit_block_terms(64, 25)


@pytest.fixture(scope="module")
def setup(tiny_clip):
    bb = FrozenClipBackbone(tiny_clip)
    fg, bg = build_dataset_text_embeddings(tiny_clip, get_tokenizer("wsss-tiny-ViT-16"), "voc")
    return bb, fg, bg


def _images(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_batched_gradcam_equals_reference_loop(setup):
    bb, fg, bg = setup
    x = _images(3, 64, 96)
    labels = [[15, 3, 7], [], [20]]  # unsorted on purpose; an image without labels
    batched = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)(x, labels)
    looped = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg, looped=True)(x, labels)
    assert isinstance(batched, CamOutput) and batched.grid == (4, 6)
    assert [k.tolist() for k in batched.keys] == [[3, 7, 15], [], [20]]
    assert all(k.dtype == np.int64 for k in batched.keys)
    assert [tuple(c.shape) for c in batched.cams] == [(3, 4, 6), (0, 4, 6), (1, 4, 6)]
    for a, b in zip(batched.cams, looped.cams):
        assert a.dtype == torch.float32
        if a.numel():  # min-max scaled to [0, 1]: scale 1
            assert_close_f32(a, b, terms=GRADCAM_TERMS, scale=1.0)
    assert_close_f32(batched.attn, looped.attn, terms=ATTN_TERMS, scale=1.0)  # probabilities: scale 1
    assert batched.cams[0].grad_fn is None
    with torch.no_grad():  # callers may hold no_grad (e.g. while dumping); the last block re-enables autograd
        again = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)(x, [torch.tensor([7, 3, 15]), (), np.array([20])])
    for a, b in zip(batched.cams, again.cams):
        torch.testing.assert_close(a, b)


def test_sources_with_no_labels_at_all(setup):
    bb, fg, bg = setup
    x = _images(2, 64, 64)
    for name in ("clip_es_gradcam", "excel_svc"):
        out = build_cam_source(name, backbone=bb, fg_text=fg, bg_text=bg)(x, [[], []])
        assert [tuple(c.shape) for c in out.cams] == [(0, 4, 4), (0, 4, 4)]
        assert out.attn.shape == (2, 12, 16, 16) and len(out.features.tokens) == 12


def test_gradcam_against_hooked_open_clip_block(setup, tiny_clip):
    """Independent oracle: GradCAM through open_clip's own last block with a hook on its ln_1 (as the reference)."""
    bb, fg, bg = setup
    x = _images(1, 64, 64, seed=3)
    classes = [2, 9]
    out = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)(x, [classes])
    tokens = bb(x, num_blocks=bb.num_blocks - 1).tokens[-1]
    last = tiny_clip.visual.transformer.resblocks[-1]
    text = torch.cat([fg[[c - 1 for c in classes]], bg])
    for j in range(len(classes)):
        captured = {}
        handle = last.ln_1.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
        with torch.enable_grad():
            inp = tokens.clone().requires_grad_(True)
            y = last(inp)
            handle.remove()
            img = F.normalize((tiny_clip.visual.ln_post(y)[:, 1:].mean(1) @ tiny_clip.visual.proj), dim=-1)
            prob = (tiny_clip.logit_scale.exp() * img @ text.t()).softmax(-1)
            (grad,) = torch.autograd.grad(prob[0, j], captured["a"])
        act = captured["a"][0, 1:].detach()
        cam = torch.relu(act @ grad[0, 1:].mean(0)).reshape(4, 4)
        for _ in range(2):  # scale_cam_image per target layer, then again after the (ReLU, mean) aggregation
            cam = torch.relu(cam)
            cam = cam - cam.min()
            cam = cam / (cam.max() + 1e-7)
        assert_close_f32(out.cams[0][j], cam, terms=GRADCAM_TERMS, scale=1.0)  # min-max scaled: scale 1


def test_gradcam_range_features_and_attention(setup):
    bb, fg, bg = setup
    x = _images(2, 64, 64, seed=1)
    out = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg, logit_scale=100.0)(x, [[1, 12], [5]])
    for cam in out.cams:
        assert cam.min() >= 0 and cam.max() <= 1
        peaks = cam.flatten(1).max(1).values
        assert torch.all(peaks > 0.999), peaks  # max 1 per present class (up to the reference's 1e-7 eps)
    full = bb(x)
    assert len(out.features.tokens) == bb.num_blocks
    for i, (ours, ref) in enumerate(zip(out.features.tokens, full.tokens)):
        assert_close_f32(ours, ref, terms=(i + 1) * vit_block_terms(64, 17))  # blocks 0..i, another order
    assert out.attn.shape == (2, bb.num_blocks, 16, 16)
    assert_close_f32(out.attn, attention_without_cls(full.attn), terms=ATTN_TERMS, scale=1.0)


def test_gradcam_attn_layers_keeps_the_last_maps_and_the_cams(setup):
    bb, fg, bg = setup
    x = _images(2, 64, 64, seed=2)
    labels = [[1, 12], [5]]
    full = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)(x, labels)
    last8 = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg, attn_layers=8)(x, labels)
    assert last8.attn.shape == (2, 8, 16, 16)
    assert_close_f32(last8.attn, full.attn[:, -8:], terms=ATTN_TERMS, scale=1.0)
    for a, b in zip(last8.cams, full.cams):
        assert_close_f32(a, b, terms=GRADCAM_TERMS + ATTN_TERMS, scale=1.0)  # the blocks before, then GradCAM
    # A per-call value overrides the source's (the WeCLIP head asks for the maps its step reads).
    last6 = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg, attn_layers=8)(x, labels, attn_layers=6)
    assert last6.attn.shape == (2, 6, 16, 16)
    assert_close_f32(last6.attn, full.attn[:, -6:], terms=ATTN_TERMS, scale=1.0)
    for a, b in zip(last6.cams, full.cams):
        assert_close_f32(a, b, terms=GRADCAM_TERMS + ATTN_TERMS, scale=1.0)
    with pytest.raises(ValueError, match="attn_layers"):
        ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg, attn_layers=13)
    with pytest.raises(ValueError, match="attn_layers"):
        ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)(x, labels, attn_layers=0)


def test_gradcam_block_runs_in_the_weights_precision_under_autocast(setup, monkeypatch):
    """Under autocast the GradCAM block (forward and class-score gradients) runs in float32: fp16 gradients
    lose most of their bits. Its outputs keep the dtypes the earlier blocks produced."""
    bb, fg, bg = setup
    x = _images(2, 64, 64, seed=4)
    labels = [[1, 12], [5]]
    cam = ClipESGradCAM(backbone=bb, fg_text=fg, bg_text=bg)
    ref = cam(x, labels)
    seen = []
    batched = ClipESGradCAM._batched

    def spy(self, xs, *a):
        seen.append((xs.dtype, torch.is_autocast_enabled("cpu")))
        return batched(self, xs, *a)

    monkeypatch.setattr(ClipESGradCAM, "_batched", spy)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            out = cam(x, labels)
            earlier = bb(x, num_blocks=bb.num_blocks - 1)
        assert seen[-1] == (torch.float32, False)
        assert out.features.tokens[-1].dtype == earlier.tokens[-1].dtype
        assert out.attn.dtype == attention_without_cls(earlier.attn).dtype
        err = torch.cat([(a - b).flatten() for a, b in zip(out.cams, ref.cams)]).norm()
        err = (err / torch.cat([b.flatten() for b in ref.cams]).norm()).item()
        # Measured: fp16 0.16% (0.77% with the block under autocast), bf16 2.0% (2.9%): from the earlier blocks.
        assert err < (0.004 if dtype == torch.float16 else 0.025), (dtype, err)
        assert all(c.dtype == torch.float32 for c in out.cams)


def test_gradcam_bad_inputs(setup):
    bb, fg, bg = setup
    cam = build_cam_source("clip_es_gradcam", backbone=bb, fg_text=fg, bg_text=bg)
    x = _images(1, 64, 64)
    with pytest.raises(ValueError, match="outside 1..20"):
        cam(x, [[0]])
    with pytest.raises(ValueError, match="outside 1..20"):
        cam(x, [[21]])
    with pytest.raises(ValueError, match="label lists"):
        cam(x, [[1], [2]])
    with pytest.raises(ValueError, match="fg_text"):
        ClipESGradCAM(backbone=bb, fg_text=fg[:, :10], bg_text=bg)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        cam(x, [[1]])


def _scale_cam_image(cam: np.ndarray) -> np.ndarray:
    """pytorch_grad_cam's ``scale_cam_image`` (no resize), in float64."""
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def test_gradcam_scaling_applies_both_reference_passes():
    # A small raw CAM: one min-max pass leaves the maximum at 1e-6 / (1e-6 + 1e-7) = 0.909; the reference's layer
    # aggregation (ReLU, mean over the one layer, min-max again) brings it to 1 - O(1e-7).
    raw = torch.tensor([[[0.0, 2.5e-7], [5e-7, 1e-6]]])
    one = _scale_cam_image(raw[0].double().numpy())
    ref = _scale_cam_image(np.maximum(one[None], 0).mean(axis=0))
    ours = gradcam_scale(raw)
    assert abs(ours.max().item() - 1.0) < 1e-6 and abs(one.max() - 1.0) > 0.05
    np.testing.assert_allclose(ours[0].double().numpy(), ref, rtol=0, atol=4 * 2.0 ** -24)  # two float32 divisions
    # The CAM sources go through it: a GradCAM map's maximum is 1 up to float32 rounding, however small the gradients.
    acts = torch.zeros(1, 5, 3)
    acts[0, 1:, 0] = torch.tensor([0.0, 1.0, 2.0, 4.0])
    cam = gradcam_from_weights(acts, torch.tensor([[1e-6, 0.0, 0.0]]), (2, 2))
    assert abs(cam.max().item() - 1.0) < 1e-6


def test_minmax_scale_reference_formula():
    cam = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    torch.testing.assert_close(minmax_scale(cam), (cam - 2.0) / (8.0 + 1e-7))
    assert torch.equal(minmax_scale(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))


def test_excel_svc_shapes_gradient_free_and_parity(setup):
    bb, fg, bg = setup
    x = _images(2, 64, 96, seed=2)
    labels = [[4, 11], [20]]
    doc = ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg)
    par = build_cam_source("excel_svc", backbone=bb, fg_text=fg, bg_text=bg, parity=True)
    out, out_p = doc(x, labels), par(x, labels)
    assert out.grid == (4, 6)
    assert [tuple(c.shape) for c in out.cams] == [(2, 4, 6), (1, 4, 6)]
    for c in out.cams + out_p.cams:
        assert c.dtype == torch.float32 and c.grad_fn is None and not c.requires_grad
        assert c.min() >= 0 and c.max() <= 1
    assert out.attn.shape == (2, 12, 24, 24) and out.attn.grad_fn is None
    last6 = doc(x, labels, attn_layers=6)
    assert torch.equal(last6.attn, out.attn[:, -6:])  # the same pass, the first maps dropped
    # Only the kept maps stay alive (not a view into all 12: on a GPU that held the step's peak) ...
    assert last6.attn.untyped_storage().nbytes() == last6.attn.numel() * last6.attn.element_size()
    assert len(last6.features.attn) == 6 and len(last6.features.tokens) == 12  # ... and all blocks' tokens
    assert all(torch.equal(a, b) for a, b in zip(last6.features.attn, out.features.attn[-6:]))
    assert all(torch.equal(a, b) for a, b in zip(last6.cams, out.cams))
    with pytest.raises(ValueError, match="attn_layers"):
        doc(x, labels, attn_layers=13)
    assert max((a - b).abs().max().item() for a, b in zip(out.cams, out_p.cams)) > 1e-3  # parity changes maps
    # The original path is the plain CLIP: features equal a normal pass.
    full = bb(x)
    for i, (ours, ref) in enumerate(zip(out.features.tokens, full.tokens)):
        assert_close_f32(ours, ref, terms=(i + 1) * vit_block_terms(64, 25))  # blocks 0..i, another order
    # Parity: SVC blocks (the last 5) return head-summed attention, earlier blocks head-averaged.
    heads = bb.num_heads
    # Terms: the maps of one pass, summed over heads instead of averaged: scale heads (probabilities times heads).
    assert_close_f32(out_p.attn[:, 7:], heads * out.attn[:, 7:], terms=ATTN_TERMS + heads, scale=heads)
    torch.testing.assert_close(out_p.attn[:, :7], out.attn[:, :7])
    # The CAMs are the present-class columns of the full alignment maps.
    maps, _, _ = doc.alignment_maps(x)
    assert maps.shape == (2, 24, 20)
    torch.testing.assert_close(out.cams[0][1], maps[0, :, 10].reshape(4, 6))


def test_excel_svc_batch_independent_and_svc_blocks(setup):
    bb, fg, bg = setup
    x = _images(2, 64, 64, seed=4)
    src = ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg, svc_blocks=3)
    both = src(x, [[1, 2], [3]])
    alone = src(x[1:], [[3]])
    # Terms: 12 blocks on a batch of 2 vs 1 (other blockings), then the min-max scaled maps (scale 1).
    assert_close_f32(both.cams[1], alone.cams[0], terms=ATTN_TERMS + GRADCAM_TERMS, scale=1.0)
    assert not torch.allclose(both.cams[0], ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg)(x, [[1, 2], [3]]).cams[0])
    with pytest.raises(ValueError, match="svc_blocks"):
        ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg, svc_blocks=12)


def test_feature_surgery_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(2, 7, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    prob = (2 * img[:, :1] @ text.t()).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    feats = img[:, :, None, :] * text[None, None] * w[..., None]  # (B, N, T, E)
    ref = (feats - feats.mean(2, keepdim=True)).sum(-1)
    # Terms: the 16-long product sum per (token, text), the 5-text mean subtracted (softmax over 5 texts first);
    # scale: sum_e |img_e text_e w| <= max w (unit vectors), before the mean cancels.
    assert_close_f32(feature_surgery(img, text), ref, terms=16 + 2 * 5, scale=w.abs().max())
    mm = minmax_over_tokens(ref)
    assert torch.allclose(mm.amin(1), torch.zeros(2, 5)) and torch.allclose(mm.amax(1), torch.ones(2, 5))


def test_enrich_text_drops_lowest_attributes():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    bank = torch.randn(8, 112, generator=g)
    out = enrich_text(t, bank, topk=0.9)
    logits = t @ bank
    keep = logits >= logits.sort(dim=1, descending=True).values[:, 100:101]  # 112 - int(0.1 * 112) = 101 kept
    assert keep.sum(1).tolist() == [101] * 3
    w = torch.where(keep, logits, torch.full_like(logits, float("-inf"))).softmax(1)
    torch.testing.assert_close(out, F.normalize(w @ bank.t() + t, dim=-1))
    with pytest.raises(ValueError, match="topk"):
        enrich_text(t, bank, topk=0.0)


def test_enrich_text_parity_uses_rows_as_given():
    # attr_aggregate takes the class rows as its caller gave them; the default normalises them first.
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(3, 8, generator=g), dim=-1) * torch.tensor([[1.0], [1.01], [0.98]])
    bank = F.normalize(torch.randn(8, 20, generator=g), dim=0)

    def reference(rows):
        logits = rows @ bank
        n_keep = 20 - int((1 - 0.9) * 20)  # the reference's count (19: float rounding of 0.1 * 20)
        keep = logits >= logits.sort(dim=1, descending=True).values[:, n_keep - 1:n_keep]
        w = torch.where(keep, logits, torch.full_like(logits, float("-inf"))).softmax(1)
        return F.normalize(w @ bank.t() + rows, dim=-1)

    torch.testing.assert_close(enrich_text(t, bank, parity=True), reference(t))
    torch.testing.assert_close(enrich_text(t, bank), reference(F.normalize(t, dim=-1)))
    assert (enrich_text(t, bank, parity=True) - enrich_text(t, bank)).abs().max() > 1e-4
    unit = F.normalize(t, dim=-1)
    torch.testing.assert_close(enrich_text(unit, bank, parity=True), enrich_text(unit, bank))


def test_attribute_bank_roundtrip_and_enrichment(setup, tmp_path):
    bb, fg, bg = setup
    bank = torch.randn(64, 6)
    torch.save([bank, torch.zeros(20, 6)], tmp_path / "bank.pth")
    torch.testing.assert_close(load_attribute_bank(tmp_path / "bank.pth"), bank)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_attribute_bank(tmp_path / "missing.pth")
    enriched = ExcelSVC(backbone=bb, fg_text=fg, bg_text=bg, attribute_bank=bank)
    torch.testing.assert_close(enriched.text[:20], enrich_text(fg, bank))


def test_excel_svc_passes_parity_to_the_text_enrichment(setup):
    """ExcelSVC(parity=..., attribute_bank=...) enriches its class rows with enrich_text(..., parity=parity): under
    parity the rows as given (ExCEL's attr_aggregate), by default normalised first; they differ for rows that are
    not unit norm."""
    bb, fg, bg = setup
    g = torch.Generator().manual_seed(7)
    rows = fg * torch.empty(fg.shape[0], 1).uniform_(0.5, 2.0, generator=g)  # norms 0.5 .. 2
    bank = torch.randn(fg.shape[1], 12, generator=g)
    texts = {}
    for parity in (False, True):
        src = ExcelSVC(backbone=bb, fg_text=rows, bg_text=bg, parity=parity, attribute_bank=bank)
        # The source's own last step (one normalisation of the class and background rows together): same ops, exact.
        expected = F.normalize(torch.cat([enrich_text(rows, bank, parity=parity), bg]), dim=-1)
        assert torch.equal(src.text, expected)
        texts[parity] = src.text[:fg.shape[0]]
    assert (texts[True] - texts[False]).abs().max() > 1e-2  # parity reached enrich_text


def test_build_attribute_bank_kmeans(tiny_clip):
    pytest.importorskip("sklearn")
    desc = {"cat": ["a clean origami cat. it has whiskers.", "a clean origami cat. it has fur."],
            "dog": ["a clean origami dog. it barks.", "a clean origami dog. it has a tail.",
                    "a clean origami dog. it has paws."]}
    built, membership = build_attribute_bank(desc, tiny_clip, get_tokenizer("wsss-tiny-ViT-16"), n_attr=3)
    assert built.shape == (64, 3) and membership.shape == (2, 3)
    assert torch.equal(membership.sum(0), torch.ones(3))


def test_registry_lists_valid_names():
    assert {"clip_es_gradcam", "excel_svc"} <= set(CAM_SOURCES.list_names())
    with pytest.raises(KeyError, match="clip_es_gradcam.*excel_svc"):
        build_cam_source("no_such_source")
