# ExCEL stage one (reference_spec 4) on a frozen OpenAI CLIP ViT-B/16 in fp32: SVC + TSE attribute maps refined with
# the last 6 attention maps (box 0.79), a decoder over all 12 block outputs, ExCEL's decoder affinity and LVC.
clip = dict(model_name="ViT-B-16", pretrained="openai", weights=None, precision="fp32",
            template="a clean origami {}.")
# descriptors: ExCEL's released *_embedding_bank.pth or a class-descriptions JSON (clustered into num_attributes);
# None runs without text enrichment (TSE).
cam = dict(source="excel_svc", box_threshold=0.79, attn_layers=6, bg_exponent=1.0, par=True, parity=False,
           descriptors=None, num_attributes=112, topk=0.9)
# Reference quirks (reference_spec 7.3), all off here: batch_global_mean=True couples the images of a batch in LVC
# and the decoder affinity, aff_ignore_diagonal=False keeps the self pairs in the affinity labels,
# val_box_threshold=0.75 validates with another box than training, cam.parity=True sums the SVC attention over heads.
head = dict(
    type="excel", embed_dim=256, decoder_layers=3, decoder_heads=8, dropout=0.1,
    aff_loss_weight=0.1, aff_radius=8, lvc_start_step=14000, aff_label_switch_step=24000, rfm_score="signed",
    val_box_threshold=None, batch_global_mean=False, aff_ignore_diagonal=True,
)
# Effective lr 1e-3 (the reference's 1e-4 times its hidden 10x multiplier), AdamW wd 0.01, warmup 50 then poly 1.
# The reference ran in float32 throughout: amp="none" for parity.
train = dict(max_iters=30000, batch_size=4, lr=1e-3, weight_decay=0.01, warmup_iters=50, power=1.0, amp="auto",
             log_interval=50, ckpt_interval=2000, val_interval=2000, val_max_images=0)
# ExCEL's inference (infer_seg_voc): the whole image resized to squares 320 s, s in {0.7, 1.0, 1.2, 1.5}, flip fused at
# every scale (parity_no_flip_at_1=True: the reference's un-flipped scale 1.0), each upsampled to the image and
# averaged; then the dense CRF with CLIP-ES's parameters.
dump = dict(protocol="excel", square_size=320, parity_no_flip_at_1=False, scales=(0.7, 1.0, 1.2, 1.5), flip=True,
            batch_size=8, label_constrained=True, ignore_threshold=0.0, save_probs=False, num_shards=16,
            crf=dict(enabled=True, iterations=10, pos_xy_std=1.0, pos_w=3.0, bi_xy_std=67.0, bi_rgb_std=3.0, bi_w=4.0,
                     workers=0))
