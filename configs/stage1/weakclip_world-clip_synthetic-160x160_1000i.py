# WeakCLIP head on the synthetic world (`make pseudo-labels DATASET=synthetic HEAD=weakclip`): the tiny-CLIP smoke
# config with the in-repo world CLIP (`make world`), so its CAM cues and pseudo-masks mean something offline.
# It learns from this run's initial CAM shards (21 classes, 240 images): at the smoke config's 300 iterations and
# lr 1e-3 the head still predicts background everywhere (val decoder mIoU 4.0); with lr 2e-3 it reached 12.8 / 35.6 /
# 40.4 / 42.9 at steps 250 / 500 / 750 / 1000 (about 0.11 s per step on 2 idle cores), hence 1000 steps.
_base_ = ["./weakclip_tiny-clip_synthetic-160x160_300i.py"]
run = dict(name="weakclip_world")
clip = dict(model_name="wsss-world-ViT-16", pretrained=None, weights="world:default")
train = dict(max_iters=1000, lr=2e-3, val_interval=250, ckpt_interval=250)
