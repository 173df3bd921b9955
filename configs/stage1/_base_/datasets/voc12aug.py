# PASCAL VOC 2012 + SBD (train_aug = 10,582 images), under $WSSS_DATA_ROOT/VOC2012 unless data.root is set.
data = dict(dataset="voc", root=None, train_split="train_aug", val_split="train", dump_split="train_aug",
            eval_split="train", crop_size=320, scale_range=(0.5, 2.0), flip=True, normalization="imagenet",
            num_workers=8)
