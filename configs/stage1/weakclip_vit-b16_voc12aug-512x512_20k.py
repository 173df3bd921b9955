# WeakCLIP head (reference_spec 5) on frozen OpenAI CLIP ViT-B/16, VOC 2012 train_aug, 512x512 crops, 20k
# iterations. It refines existing pseudo-masks: by default the WeCLIP run's dump of train_aug (train that run
# first: make pseudo-labels DATASET=voc RUN=weclip_vit-b16_voc12aug), or set head.options.masks to any shard dir
# covering data.train_split (e.g. runs/voc/<run>/cams/ written by `make cams` with data.eval_split=train_aug).
# Reference: batch 8 per GPU on 2 GPUs (GPUS=2), AdamW lr 1e-4 wd 3e-5, linear warmup 1500 then cosine (this loop
# decays linearly: power 1), multi-scale 0.5-1.75 + flip inference, CRF 83/5/3.
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/voc12aug.py"]
run = dict(name="weakclip_vit-b16_voc12aug", seed=504)
data = dict(crop_size=512, scale_range=(0.5, 2.0))
head = dict(
    type="weakclip", embed_dim=256, decoder_layers=3, decoder_heads=4, dropout=0.1,
    options=dict(
        masks="runs/voc/weclip_vit-b16_voc12aug/pseudo_masks",
        out_indices=(3, 5, 7, 11), n_ctx=8, tau=0.07, loss_stride=8,
        seed_weight=1.0, boundary_weight=1.0, score_weight=0.4,
        # parity=True restores every reference quirk (context std 1, unchained co-attention, class embedding
        # added twice, frozen random adapters, drop-path 0.1 in the frozen encoder, CE over all pixels).
        parity=False,
    ),
)
train = dict(max_iters=20000, batch_size=8, lr=1e-4, weight_decay=3e-5, warmup_iters=1500, warmup_ratio=1e-6,
             power=1.0, amp="auto", log_interval=50, ckpt_interval=2000, val_interval=2000, val_max_images=0)
dump = dict(long_side=512, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True,
            crf=dict(enabled=True, iterations=10, pos_xy_std=3.0, pos_w=3.0, bi_xy_std=83.0, bi_rgb_std=5.0,
                     bi_w=3.0))
