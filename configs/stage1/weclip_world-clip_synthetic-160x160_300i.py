# Demo config on the synthetic world: the in-repo tiny CLIP trained contrastively on captioned synthetic images
# (`make world`, about 10 minutes on 2 CPU cores, cached under $WSSS_CACHE/world), so CAMs, pseudo-masks and the
# retrained model mean something offline. Same code path as the VOC config.
_base_ = ["./_base_/weclip_vit-b16.py", "./_base_/datasets/synthetic.py"]
run = dict(name="demo", seed=1)
# "world:default" resolves to the weights `python -m stage1_cam.world --preset default` trains (stage1_cam/world.py).
clip = dict(model_name="wsss-world-ViT-16", pretrained=None, weights="world:default")
# RFM (issue 9, measured 2026-11-22 on the 2-core CPU; online labels = first 30 val images, dumped = train_aug
# unless noted):
#   this config (aff_loss_weight 0.1, RFM from step 150): online 62.3 (RFM off: 67.7), dumped 64.4; dumped for
#   the val split (the slow test's protocol) 66.6 against 69.0 with RFM off.
#   The decoder affinity A_f = sigmoid(F^T F) starts saturated at 1 (affinity loss 0.50 at step 25) and with
#   weight 0.1 is still poor at step 300 (loss ~0.35): M * A_f is then worse than the plain attention mean.
#   aff_loss_weight=1.0 trains A_f within 200 steps: online 70.2 / 70.3 (seeds 1 / 2) against 67.7 off, but
#   the dumped masks do not follow (63.6 / 63.9 on, 66.3 / 63.4 off), and on training images RFM labels equal
#   the plain ones (62.5 vs 62.4, 60 train_aug images). RFM on > off for the dumped masks is not reached
#   within a ~2-minute stage 1; see the issue-9 report.
head = dict(embed_dim=64, decoder_layers=1, decoder_heads=2, rfm=dict(start_step=150))
train = dict(max_iters=300, batch_size=4, amp="none", log_interval=25, ckpt_interval=100, val_interval=100,
             val_max_images=30)
dump = dict(long_side=224, num_shards=4, batch_size=8, crf=dict(workers=1))
