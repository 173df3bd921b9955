# COCO 2014 converted to VOC-style masks (81 classes), under $WSSS_DATA_ROOT/coco2014 unless data.root is set.
data = dict(dataset="coco", root=None, train_split="train", val_split="val", dump_split="train",
            eval_split="train", crop_size=320, scale_range=(0.5, 2.0), flip=True, normalization="imagenet",
            num_workers=8)
