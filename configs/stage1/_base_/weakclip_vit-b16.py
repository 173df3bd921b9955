# WeakCLIP head (reference_spec 5) on a frozen OpenAI CLIP ViT-B/16. It refines existing pseudo-masks: the run's
# initial CAMs (cam section, `make cams`) unless head.masks names another shard directory.
clip = dict(model_name="ViT-B-16", pretrained="openai", weights=None, precision="fp32",
            template="a clean origami {}.")
cam = dict(source="clip_es_gradcam", box_threshold=0.4, attn_layers=8, bg_exponent=1.0, par=True, parity=False)
head = dict(
    type="weakclip", embed_dim=256, decoder_layers=3, decoder_heads=4, dropout=0.1,
    masks=None, out_indices=(3, 5, 7, 11), n_ctx=8, tau=0.07, loss_stride=8,
    seed_weight=1.0, boundary_weight=1.0, score_weight=0.4,
    # parity=True restores the six model quirks (context std 1, unchained co-attention, class embedding added
    # twice, frozen random adapters, drop-path 0.1 in the frozen encoder, CE over all pixels); what it does not
    # cover (split, rescale, schedule, dump protocol): stage1_cam/heads/weakclip/__init__.py.
    parity=False,
)
# Reference: AdamW lr 1e-4 wd 3e-5, linear warmup 1500 then cosine (this loop decays linearly: power 1).
train = dict(max_iters=20000, batch_size=8, lr=1e-4, weight_decay=3e-5, warmup_iters=1500, warmup_ratio=1e-6,
             power=1.0, amp="auto", log_interval=50, ckpt_interval=2000, val_interval=2000, val_max_images=0)
# The reference's scales (0.5-1.75) + flip and CRF 83/5/3, through the shared protocol: long side 512, whole images,
# logits averaged (the reference: short side 512, slide windows 512 / stride 341, probabilities averaged).
dump = dict(long_side=512, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, batch_size=8, label_constrained=True,
            ignore_threshold=0.0, save_probs=False, num_shards=16,
            crf=dict(enabled=True, iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=83.0, bi_rgb_std=5.0,
                     bi_w=3.0, workers=0))
