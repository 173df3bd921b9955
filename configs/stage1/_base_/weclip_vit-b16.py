# WeCLIP stage one on a frozen OpenAI CLIP ViT-B/16 (reference_spec sections 1 and 9).
clip = dict(model_name="ViT-B-16", pretrained="openai", weights=None, precision="fp32",
            template="a clean origami {}.")
cam = dict(source="clip_es_gradcam", box_threshold=0.4, attn_layers=8, bg_exponent=1.0, par=True, parity=False)
head = dict(
    type="weclip", embed_dim=256, decoder_layers=3, decoder_heads=8, dropout=0.1,
    aff_loss_weight=0.1, aff_radius=8,
    # The reference's RFM effectively switched on at step 9,144 (validation forwards were counted); its config
    # said 15,000. Set 9144 for parity with the published numbers.
    rfm=dict(enabled=True, start_step=15000, layers=6, score="signed"),
)
# Effective lr 2e-3 (the reference's 2e-4 times its hidden 10x multiplier), AdamW wd 0.01, warmup 50 then poly.
train = dict(max_iters=30000, batch_size=4, lr=2e-3, weight_decay=0.01, warmup_iters=50, power=1.0, amp="auto",
             log_interval=50, ckpt_interval=2000, val_interval=2000, val_max_images=0)
# parity_sizes=True: the reference's unsnapped input sizes (int(H r) x int(W r); the patch embedding drops the rest).
dump = dict(long_side=512, scales=(1.0, 0.75), flip=True, batch_size=8, label_constrained=True,
            ignore_threshold=0.0, save_probs=False, num_shards=16, parity_sizes=False,
            crf=dict(enabled=True, iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=64.0, bi_rgb_std=5.0,
                     bi_w=4.0, workers=0))
