"""Frozen CLIP backbone, weight resolution and prompt embeddings (tiny random CLIP, CPU, offline)."""

from __future__ import annotations

import os
import urllib.request
import warnings

import pytest
import torch
import torch.nn.functional as F

from stage1_cam.constants import ENV_CLIP_WEIGHTS
from stage1_cam.models.clip_backbone import ClipFeatures, FrozenClipBackbone, softmax_attention
from stage1_cam.models.pretrained import load_clip
from stage1_cam.models.text import build_dataset_text_embeddings, build_text_embeddings, get_tokenizer
from tests.numerics import assert_close_f32, f32_tolerance, vit_block_terms

TINY = "wsss-tiny-ViT-16"


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return FrozenClipBackbone(tiny_clip)


def _images(b=2, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


def test_shapes_320_square(backbone):
    feats = backbone(_images(2, 320, 320))
    assert isinstance(feats, ClipFeatures)
    assert feats.grid == (20, 20)
    assert len(feats.tokens) == len(feats.attn) == backbone.num_blocks == 12
    for t, a in zip(feats.tokens, feats.attn):
        assert t.shape == (2, 401, 64)
        assert a.shape == (2, 401, 401) and a.dtype == torch.float32
        # Terms: the softmax's 401-term denominator, then the 401-term row sum; probabilities: partial sums <= 1.
        assert_close_f32(a.sum(-1), torch.ones(2, 401), terms=2 * 401, scale=1.0)
        assert (a >= 0).all()
    assert not feats.tokens[-1].requires_grad


def test_non_square_and_partial_blocks(backbone):
    feats = backbone(_images(2, 64, 96), num_blocks=5)
    assert feats.grid == (4, 6)
    assert len(feats.tokens) == 5 and feats.tokens[0].shape == (2, 25, 64) and feats.attn[4].shape == (2, 25, 25)
    # Remainder pixels beyond a multiple of the patch size are dropped by the stride-16 conv.
    odd = backbone(_images(1, 70, 100), num_blocks=1)
    assert odd.grid == (4, 6)
    with pytest.raises(ValueError, match="num_blocks"):
        backbone(_images(1), num_blocks=13)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.zeros(1, 1, 64, 64))


def test_blocks_match_open_clip(backbone, tiny_clip):
    """At the native 64x64 size our block-by-block pass equals open_clip's own modules."""
    x = _images(2, 64, 64)
    feats = backbone(x)
    with torch.no_grad():
        y = tiny_clip.visual._embeds(x)
        for i, blk in enumerate(tiny_clip.visual.transformer.resblocks):
            y = blk(y)
            # Terms: blocks 0..i, each evaluated in another order (fused attention), on the residual stream.
            assert_close_f32(feats.tokens[i], y, terms=(i + 1) * vit_block_terms(64, 17))
        ref = tiny_clip.encode_image(x)
    ours = tiny_clip.visual.ln_post(feats.tokens[-1][:, 0]) @ tiny_clip.visual.proj
    # Terms: the 12 blocks, then ln_post and the 64-long projection (scale: |ln_post| @ |proj| bounds the sum).
    mag = tiny_clip.visual.ln_post(feats.tokens[-1][:, 0]).abs() @ tiny_clip.visual.proj.abs()
    assert_close_f32(ours, ref, terms=12 * vit_block_terms(64, 17) + 3 * 64, scale=mag.max())


def test_attention_matches_torch_mha(backbone):
    """Head-averaged weights equal nn.MultiheadAttention's own (average_attn_weights=True)."""
    x = backbone.embed(_images(2, 64, 96))[0]
    blk = backbone.blocks[0]
    with torch.no_grad():
        xn = blk.ln_1(x)
        _, ref = blk.attn(xn, xn, xn, need_weights=True, average_attn_weights=True)
        out = backbone.run_block(0, x)
    # Terms: q/k projections (width 64), the 16-long logits, the 25-term softmax sum, the mean over 4 heads;
    # probabilities: scale 1.
    assert_close_f32(out.attn, ref, terms=64 + 16 + 25 + 4, scale=1.0)
    torch.testing.assert_close(out.normed, xn)


def test_attention_maps_per_image_equal_one_batched_pass():
    """attention_with_maps (one image at a time) gives the same output and head-averaged maps as one pass."""
    from stage1_cam.models.clip_backbone import attention_with_maps, softmax_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 4, 25, 16, generator=g) for _ in range(3))
    probs = softmax_attention(q, k)
    out, maps = attention_with_maps(q, k, v)
    # Terms: the 25 keys of an output row (a weighted mean of v: partial sums <= max |v|), after the 25-term softmax.
    assert_close_f32(out, probs @ v, terms=2 * 25, scale=v.abs().max())
    # Terms: the 25-term softmax sum, then the mean over 4 heads; probabilities: scale 1.
    assert_close_f32(maps, probs.mean(dim=1), terms=25 + 4, scale=1.0)
    empty_out, empty_map = attention_with_maps(q[:0], k[:0], v[:0])
    assert empty_out.shape == (0, 4, 25, 16) and empty_map.shape == (0, 25, 25)
    one_out, one_map = attention_with_maps(q[:1], k[:1], v[:1])
    torch.testing.assert_close(one_out, out[:1])
    torch.testing.assert_close(one_map, maps[:1])


def test_token_mean_of_the_input_gradient_from_qkv_gradients(backbone):
    """qkv_mean_grads_to_input equals the patch-token mean of autograd's gradient w.r.t. ln_1's output."""
    from stage1_cam.models.clip_backbone import qkv_mean_grads_to_input

    x = backbone.embed(_images(2, 64, 96))[0].detach().requires_grad_(True)
    out = backbone.run_block(backbone.num_blocks - 1, x)
    target = (backbone.pool_project(out.tokens) * torch.linspace(-1, 1, backbone.embed_dim)).sum()
    ref = torch.autograd.grad(target, out.normed, retain_graph=True)[0][:, 1:].mean(dim=1)
    qkv_grads = torch.autograd.grad(target, out.qkv)
    means = [g[:, :, 1:].mean(dim=2) for g in qkv_grads]
    got = qkv_mean_grads_to_input(backbone.blocks[-1], means)
    assert got.shape == (2, backbone.width)
    # Terms: autograd sums the three 64-long products per token, then the mean over 24 tokens (ours: the other way
    # round), both after the block's backward; scale: the token mean of |dq|, |dk|, |dv| times |W|, before they cancel.
    weights = backbone.blocks[-1].attn.in_proj_weight.chunk(3)
    mag = sum(g[:, :, 1:].abs().mean(dim=2).flatten(1) @ w.abs() for g, w in zip(qkv_grads, weights))
    assert_close_f32(got, ref, terms=3 * 64 + 24 + vit_block_terms(64, 25), scale=mag)


def _softmax64(q, k):
    """softmax_attention in float64 (softmax_attention itself computes in float32)."""
    return torch.softmax(q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)


def _closed_form_magnitudes(q, k, v, grad_out, skip=1):
    """Float64 sizes of what attention_qkv_grad_means's last sums add up, before they cancel, as (q, k, v).

    With the notation of its docstring: ``s/n sum_j (|v_j . G_j| + |e_j|) |k_j|``, ``s/n sum_i (|dO_i . O^J_i| +
    |d_i c_i|) |q_i|`` and ``1/n sum_i |c_i| |dO_i|``: the differences ``v_j . G_j - e_j`` and ``dO_i . O^J_i -
    d_i c_i`` are tiny where a query puts all its mass on the CLS key, while their float32 rounding scales with the
    operands.
    """
    scale, n = q.shape[-1] ** -0.5, q.shape[2] - skip
    p = _softmax64(q, k)
    d = (grad_out * (p @ v)).sum(-1)
    c = p[..., skip:].sum(-1)
    p_i = p[:, :, skip:].transpose(-2, -1)
    col = (v * (p_i @ grad_out[..., skip:, :])).sum(-1).abs() + (p_i @ d[..., skip:, None])[..., 0].abs()
    row = (grad_out * (p[..., skip:] @ v[:, :, skip:])).sum(-1).abs() + (d * c).abs()
    return (torch.einsum("sbhl,bhld->sbhd", col, k.abs()) * (scale / n),
            torch.einsum("sbhl,bhld->sbhd", row, q.abs()) * (scale / n),
            torch.einsum("bhl,sbhld->sbhd", c, grad_out.abs()) / n)


@pytest.mark.parametrize("cls_bias", [0.0, 10.0])  # 10: most queries put > 0.99 of their mass on the CLS key
def test_attention_grad_means_equal_autograd(cls_bias):
    """The closed-form token means of the q, k, v gradients equal autograd's, for several output gradients."""
    from stage1_cam.models.clip_backbone import attention_for_grads, attention_qkv_grad_means

    g = torch.Generator().manual_seed(3)
    b, h, n, hd = 2, 3, 13, 8
    q, k, v = (torch.randn(b, h, n, hd, generator=g) for _ in range(3))
    q[..., 0], k[..., 0] = 1.0, 0.0
    k[:, :, 0, 0] = cls_bias * hd ** 0.5  # adds cls_bias to every query's (scaled) CLS logit
    grad_out = torch.randn(2, b, h, n, hd, generator=g)
    f32 = [q, k, v]
    q, k, v, grad_out64 = (t.double() for t in (q, k, v, grad_out))  # the reference: same inputs, float64 maths
    expected = []
    for d_o in grad_out64:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = _softmax64(qg, kg) @ vg
        grads = torch.autograd.grad(out, (qg, kg, vg), grad_outputs=d_o)
        expected.append(torch.stack([gr[:, :, 1:].mean(dim=2) for gr in grads]))
    expected = torch.stack(expected, dim=1)  # (q/k/v, S, B, H, hd)
    att = attention_for_grads(*f32)
    # Terms: the n keys of one output row; P @ v is a weighted mean, so no partial sum exceeds max |v|.
    assert_close_f32(att.out, softmax_attention(*f32[:2]) @ f32[2], terms=n, scale=f32[2].abs().max())
    got = attention_qkv_grad_means(att, *f32, grad_out)
    if cls_bias:
        assert (att.probs[..., 0] > 0.99).float().mean() > 0.5
    # Terms: two hd-long dots (dO . v, dO . O), the sum over the n - 1 patch rows and the one over the n keys, on the
    # operands of the cancelling differences; the probabilities' rounding (logits |s| <= max |q| . |k| / sqrt(hd),
    # each off by hd roundings, then n in the softmax sum) is shared by both sides of those differences, so it only
    # counts relative to the result itself.
    logit = (q.abs() @ k.abs().transpose(-2, -1)).amax().item() * hd ** -0.5
    for i, (name, mag) in enumerate(zip("qkv", _closed_form_magnitudes(q, k, v, grad_out64))):
        assert got[i].shape == (2, b, h, hd), name
        tol = f32_tolerance(2 * hd + 2 * n, mag) + f32_tolerance(hd * logit + n, expected[i])
        assert_close_f32(got[i], expected[i], tol=tol, msg=name)


def test_attn_from_returns_the_last_maps_and_the_same_tokens(backbone):
    x = _images(2, 64, 96)
    full = backbone(x)
    part = backbone(x, attn_from=9)
    assert len(part.tokens) == 12 and len(part.attn) == 3
    for i, (a, b) in enumerate(zip(part.tokens, full.tokens)):  # the fused kernel before block 9 changes only speed
        # Terms: blocks 0..i evaluated in another order (fused attention before block 9).
        assert_close_f32(a, b, terms=(i + 1) * vit_block_terms(64, 25))
    for a, b in zip(part.attn, full.attn[9:]):
        # Terms: the 9 differently ordered blocks feeding these probabilities, then this block's; scale 1.
        assert_close_f32(a, b, terms=10 * vit_block_terms(64, 25), scale=1.0)


def test_positional_embedding_interpolation(backbone, tiny_clip):
    pos = tiny_clip.visual.positional_embedding
    same = backbone.positional_embedding(4, 4, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(same, pos.detach())
    big = backbone.positional_embedding(8, 12, device=torch.device("cpu"), dtype=torch.float32)
    assert big.shape == (1 + 96, 64)
    torch.testing.assert_close(big[0], pos[0].detach())  # CLS position kept
    grid = pos[1:].detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 12), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(96, 64)
    torch.testing.assert_close(big[1:], ref)
    again = backbone.positional_embedding(8, 12, device=torch.device("cpu"), dtype=torch.float32)
    assert again is big  # cached per size


def test_frozen_and_always_eval(tiny_clip):
    bb = FrozenClipBackbone(tiny_clip)
    assert sum(p.numel() for p in bb.parameters() if p.requires_grad) == 0
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    assert (bb.width, bb.num_blocks, bb.patch_size, bb.embed_dim) == (64, 12, 16, 64)


def test_last_block_autograd_and_equivalence(backbone):
    x = _images(2, 64, 64)
    feats = backbone(x)
    out, attn = backbone.last_block(feats.tokens[-2])
    torch.testing.assert_close(out, feats.tokens[-1])
    torch.testing.assert_close(attn, feats.attn[-1])
    assert out.grad_fn is None
    tokens = feats.tokens[-2].clone().requires_grad_(True)
    with torch.no_grad():  # last_block turns autograd back on for inputs that require grad
        out, _ = backbone.last_block(tokens)
    assert out.grad_fn is not None
    out.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_pool_project_ignores_cls(backbone):
    tokens = backbone(_images(2, 64, 64)).tokens[-1]
    pooled = backbone.pool_project(tokens)
    assert pooled.shape == (2, backbone.embed_dim)
    changed = tokens.clone()
    changed[:, 0] += 5.0
    torch.testing.assert_close(backbone.pool_project(changed), pooled)
    changed[:, 3] += 5.0
    assert not torch.allclose(backbone.pool_project(changed), pooled)


def test_text_embeddings(tiny_clip, backbone):
    tok = get_tokenizer(TINY)
    fg, bg = build_dataset_text_embeddings(tiny_clip, tok, "voc")
    assert fg.shape == (20, 64) and bg.shape == (25, 64)
    # Terms: the 64-term norm and the division of the two normalisations, the 64-term norm here; unit rows: scale 1.
    assert_close_f32(fg.norm(dim=-1), torch.ones(20), terms=3 * (64 + 2), scale=1.0)
    fg2, _ = build_dataset_text_embeddings(tiny_clip, tok, "voc")
    assert fg2 is fg  # cached
    ids = tok(["a clean origami cat."])
    pooled = []  # ln_final's output at the end-of-text token: the operands of the projection
    hook = tiny_clip.ln_final.register_forward_hook(lambda m, i, out: pooled.append(out[0, ids[0].argmax()]))
    try:
        raw = backbone.encode_text(ids)[0]
    finally:
        hook.remove()
    ref = F.normalize(raw, dim=-1)
    # VOC id 8 = cat, encoded in a batch of 20 prompts vs alone (other blockings of every product). Terms: the text
    # tower's blocks on the residual stream (width 64, 77 tokens of context), ln_final and the 64-long projection,
    # then the normalisation (64-term norm, division). Scale: |ln_final| @ |proj| bounds the projection's partial
    # sums (they cancel), divided by the norm the result is scaled by.
    text = tiny_clip.transformer
    terms = len(text.resblocks) * vit_block_terms(text.width, ids.shape[1]) + 3 * text.width + 64 + 2
    mag = pooled[0].abs() @ tiny_clip.text_projection.abs() / raw.norm()
    assert_close_f32(fg[7], ref, terms=terms, scale=mag)
    two, _ = build_text_embeddings(tiny_clip, tok, class_prompts=["cat"], background_words=["sky"],
                                   template=["a clean origami {}.", "a photo of a {}."])
    one_a, _ = build_text_embeddings(tiny_clip, tok, class_prompts=["cat"], background_words=["sky"])
    one_b, _ = build_text_embeddings(tiny_clip, tok, class_prompts=["cat"], background_words=["sky"],
                                     template="a photo of a {}.")
    # Terms: the sum of the two unit rows (mean: and its exact halving), the 64-term norm and the division; scale:
    # the sum cancels, so |one_a| + |one_b| over the norm of the sum.
    assert_close_f32(two, F.normalize(one_a + one_b, dim=-1), terms=1 + 64 + 2,
                     scale=(one_a.abs() + one_b.abs()) / (one_a + one_b).norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="placeholder"):
        build_text_embeddings(tiny_clip, tok, class_prompts=["cat"], background_words=[], template="no slot")


def _isolate_caches(monkeypatch, tmp_path):
    """Empty caches, offline hub, and any network access turned into a test failure."""
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", ENV_CLIP_WEIGHTS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def _no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    import open_clip.pretrained

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_network)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)


def test_missing_weights_error_is_actionable(monkeypatch, tmp_path):
    _isolate_caches(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as exc:
        load_clip("ViT-B-16", pretrained="openai")
    msg = str(exc.value)
    assert "ViT-B-16.pt" in msg and "5806e77c" in msg
    assert f"{ENV_CLIP_WEIGHTS}=/path/ViT-B-16.pt" in msg
    assert str(tmp_path / "home" / ".cache" / "clip") in msg  # where the open_clip cache was searched


def test_bad_weight_sources(monkeypatch, tmp_path):
    _isolate_caches(monkeypatch, tmp_path)
    monkeypatch.setenv(ENV_CLIP_WEIGHTS, str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=ENV_CLIP_WEIGHTS):
        load_clip("ViT-B-16", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="nope2.pt"):
        load_clip(TINY, pretrained=None, weights=str(tmp_path / "nope2.pt"))
    monkeypatch.delenv(ENV_CLIP_WEIGHTS)
    with pytest.raises(ValueError, match="valid tags"):
        load_clip("ViT-B-16", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="precision"):
        load_clip(TINY, pretrained=None, precision="fp8")
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("no-such-model", pretrained=None)


def test_weights_from_file_env_and_torchscript(monkeypatch, tmp_path, tiny_clip):
    _isolate_caches(monkeypatch, tmp_path)
    ref = tiny_clip.state_dict()
    sd_path = tmp_path / "tiny_state.pt"
    torch.save(ref, sd_path)
    loaded = load_clip(TINY, pretrained=None, weights=str(sd_path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training

    monkeypatch.setenv(ENV_CLIP_WEIGHTS, str(sd_path))  # the environment variable wins over the tag
    from_env = load_clip(TINY, pretrained="openai")
    assert torch.equal(from_env.visual.proj, tiny_clip.visual.proj)
    monkeypatch.delenv(ENV_CLIP_WEIGHTS)

    # OpenAI releases TorchScript archives; build one from the tiny model and load it strictly.
    ids = get_tokenizer(TINY)(["a cat"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(tiny_clip, (torch.zeros(1, 3, 64, 64), ids), check_trace=False)
    ts_path = tmp_path / "tiny_openai.pt"
    traced.save(str(ts_path))
    from_ts = load_clip(TINY, pretrained=None, weights=str(ts_path))
    assert all(torch.equal(from_ts.state_dict()[k], v) for k, v in ref.items())

    broken = dict(ref)
    broken.pop("visual.proj")
    bad_path = tmp_path / "broken.pt"
    torch.save(broken, bad_path)
    with pytest.raises(ValueError, match="strict"):
        load_clip(TINY, pretrained=None, weights=str(bad_path))
    assert os.path.isfile(bad_path)


def test_weights_found_in_hub_cache_offline(monkeypatch, tmp_path):
    from stage1_cam.models.pretrained import resolve_clip_weights

    _isolate_caches(monkeypatch, tmp_path)
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"stub")
    assert resolve_clip_weights("ViT-B-16", "openai") == str(snap / "open_clip_pytorch_model.bin")
    assert resolve_clip_weights("ViT-B-16", None) is None  # random init ignores caches and the environment
