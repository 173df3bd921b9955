# Smoke/demo config for the WeakCLIP head: the in-repo tiny CLIP on the synthetic dataset, CPU in minutes.
# It trains on this run's initial CAM shards (runs/synthetic/<run>/cams/, written by `make cams` /
# `python -m stage1_cam.cams CONFIG --run RUN`) unless head.masks names another shard directory.
_base_ = ["./_base_/weakclip_vit-b16.py", "./_base_/datasets/synthetic.py"]
run = dict(name="demo_weakclip", seed=1)
clip = dict(model_name="wsss-tiny-ViT-16", pretrained=None)
head = dict(embed_dim=32, decoder_layers=2, decoder_heads=2, dropout=0.1, masks=None, out_indices=(3, 5, 7, 11),
            n_ctx=4, loss_stride=8)
train = dict(max_iters=300, batch_size=4, lr=1e-3, weight_decay=3e-5, warmup_iters=20, amp="none", log_interval=25,
             ckpt_interval=100, val_interval=100, val_max_images=30)
dump = dict(long_side=224, scales=(1.0, 0.75), num_shards=4, batch_size=8,
            crf=dict(bi_xy_std=64.0, bi_rgb_std=5.0, bi_w=4.0, workers=1))
