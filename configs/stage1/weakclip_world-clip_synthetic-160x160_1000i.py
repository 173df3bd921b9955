# WeakCLIP head on the synthetic world (`make pseudo-labels DATASET=synthetic HEAD=weakclip`): the tiny-CLIP smoke
# config with the in-repo world CLIP (`make world`), so its CAM cues and pseudo-masks mean something offline.
# It learns from this run's initial CAM shards; lr 2e-3 and 1000 steps because at the smoke config's 300 steps and
# lr 1e-3 it still predicts background everywhere (learning curve: docs/results.md, "WeakCLIP on the synthetic world").
_base_ = ["./weakclip_tiny-clip_synthetic-160x160_300i.py"]
run = dict(name="weakclip_world")
clip = dict(model_name="wsss-world-ViT-16", pretrained=None, weights="world:default")
train = dict(max_iters=1000, lr=2e-3, val_interval=250, ckpt_interval=250)
