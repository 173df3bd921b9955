"""The run report: ``runs/<dataset>/<run>/report/{index.html, report.md, metrics.json, *.png}``.

Collects what the stages wrote (stage-1 training summary and validation, pseudo-mask metrics,
stage-2 metrics, env.json, config hash) and puts it next to the published anchors, each with its
protocol. ``index.html`` is self-contained (figures embedded as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from stage1_cam.config import config_hash
from stage1_cam.io.shards import shard_inputs
from stage1_cam.utils.logging import utc_timestamp
from stage1_cam.utils.run_dir import RunDir


_logger = logging.getLogger(__name__)

# Published figures (reference_spec 6), with the protocol each was measured under.
ANCHORS: List[Dict[str, Any]] = [
    {"method": "WeCLIP", "what": "retrained segmenter, VOC val", "miou": 76.4, "protocol": "msc+flip+CRF"},
    {"method": "WeCLIP", "what": "retrained segmenter, VOC test", "miou": 77.2, "protocol": "msc+flip+CRF"},
    {"method": "WeCLIP", "what": "pseudo-masks, VOC train", "miou": 78.2,
     "protocol": "online pseudo label (CAM+RFM+PAR) per the brief; no script in the repo"},
    # CLIP-ES normalised with CLIP's statistics; the WeCLIP configs use ImageNet's (data.normalization="clip" matches).
    {"method": "CLIP-ES", "what": "initial CAM, VOC train", "miou": 70.8,
     "protocol": "best bg exponent t in {1,2}; CLIP's normalisation"},
    {"method": "CLIP-ES", "what": "CAM + CRF, VOC train", "miou": 75.0,
     "protocol": "CRF argmax, no 0.95 ignore; CLIP's normalisation"},
    {"method": "ExCEL", "what": "segmenter, VOC val", "miou": 78.4, "protocol": "msc+flip (+CRF)"},
    {"method": "WeakCLIP", "what": "pseudo-masks, VOC train", "miou": 77.2, "protocol": "msc+flip + CRF"},
    {"method": "WeakCLIP", "what": "DeepLab retrained, VOC val", "miou": 74.0, "protocol": "checkpoint picked on val"},
]


def _read_json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        _logger.warning("%s is not valid JSON; ignored", path)
        return None


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)


def _figures(run: RunDir, cfg: Any, metrics: Dict[str, Any], out: Path) -> Dict[str, bytes]:
    """Confusion matrix, per-class IoU bars and qualitative overlays; each also saved as a PNG in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: Dict[str, bytes] = {}
    masks = metrics.get("pseudo_masks") or {}
    names = list(masks.get("class_names") or [])
    cm = masks.get("confusion")
    if cm is not None:
        cm = np.asarray(cm, dtype=np.float64)
        n = cm.shape[0]
        norm = cm[:, :n] / np.maximum(cm[:, :n].sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(7, 6))
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(n), names[:n] if names else range(n), rotation=90, fontsize=7)
        ax.set_yticks(range(n), names[:n] if names else range(n), fontsize=7)
        ax.set_xlabel("pseudo-mask label")
        ax.set_ylabel("ground truth")
        ax.set_title("Pseudo-mask confusion (row-normalised)")
        fig.colorbar(im, ax=ax)
        figs["confusion.png"] = _png(fig)
        plt.close(fig)
    bars = {}
    if masks.get("per_class"):
        bars["pseudo-masks"] = {k: v.get("iou") for k, v in masks["per_class"].items()}
    s2all = metrics.get("stage2") or {}
    s2 = s2all.get("msc_flip") or s2all.get("single_scale") or {}
    if s2.get("per_class_iou"):
        bars["retrained (val)"] = dict(s2["per_class_iou"])
    if bars:
        cls = list(next(iter(bars.values())).keys())
        fig, ax = plt.subplots(figsize=(10, 3.5))
        width = 0.8 / len(bars)
        for i, (label, vals) in enumerate(bars.items()):
            y = [100 * (vals.get(c) or 0.0) for c in cls]
            ax.bar(np.arange(len(cls)) + i * width, y, width, label=label)
        ax.set_xticks(np.arange(len(cls)) + 0.4 - width / 2, cls, rotation=90, fontsize=7)
        ax.set_ylabel("IoU (%)")
        ax.legend()
        ax.set_title("Per-class IoU")
        figs["per_class_iou.png"] = _png(fig)
        plt.close(fig)
    overlay = _overlays(run, cfg)
    if overlay is not None:
        figs["overlays.png"] = overlay
    for name, data in figs.items():
        (out / name).write_bytes(data)
    return figs


def _overlays(run: RunDir, cfg: Any, n: int = 4) -> Optional[bytes]:
    """Grid of image / pseudo-mask / stage-2 prediction / ground truth for a few images."""
    import matplotlib.pyplot as plt

    from stage1_cam.data import build_dataset
    from stage1_cam.data.class_names import voc_palette
    from stage1_cam.io.shards import ShardReader

    if not (run.shard_dir / "manifest.json").is_file():
        return None
    try:
        reader = ShardReader(run.shard_dir)
        ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.dump_split)
    except (FileNotFoundError, ValueError) as e:
        _logger.warning("overlays skipped: %s", e)
        return None
    pal = np.array(voc_palette(256), dtype=np.uint8)
    ids = [i for i in reader.ids][:n]
    pred_dir = run.stage2_dir / "pred_train"
    cols = 4 if pred_dir.is_dir() else 3
    fig, axes = plt.subplots(len(ids), cols, figsize=(3 * cols, 2.4 * len(ids)), squeeze=False)
    for r, name in enumerate(ids):
        img = ds.load_image(name)
        panels = [("image", img), ("pseudo-mask", pal[reader.label(name)])]
        if cols == 4:
            import cv2

            p = cv2.imread(str(pred_dir / f"{name}.png"), cv2.IMREAD_UNCHANGED)
            panels.append(("stage-2 prediction", pal[p] if p is not None else np.zeros_like(img)))
        gt = ds.load_gt(name)
        panels.append(("ground truth", pal[gt] if gt is not None else np.zeros_like(img)))
        for c, (title, im) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    reader.close()
    data = _png(fig)
    plt.close(fig)
    return data


def _mtime_utc(path: Path) -> Optional[str]:
    try:
        return utc_timestamp(path.stat().st_mtime)
    except OSError:
        return None


def _shard_changes(recorded: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Optional[List[str]]:
    """How the shards changed since a figure was computed: None without a record, [] when unchanged."""
    if not isinstance(recorded, dict):
        return None
    out = [f"{f} re-dumped or modified" for f in sorted(set(recorded) & set(current)) if recorded[f] != current[f]]
    out += [f"{f} gone" for f in sorted(set(recorded) - set(current))]
    out += [f"{f} added" for f in sorted(set(current) - set(recorded))]
    return out


def _inputs_text(shards: Optional[Dict[str, Any]]) -> str:
    if not shards:
        return "n/a"
    digests = ", ".join(f"{f.split('-of-')[0]}:{str(h)[:8]}" for f, h in sorted(shards.items()))
    return f"{len(shards)} shards (sha256 {digests})"


def _provenance(run: RunDir, m: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per figure source: when it was computed, from which files (hashes), and whether those changed since.

    The pseudo-mask metrics record the shards' sha256 (``inputs``); stage 2 records the shards it trained on
    (``stage2/inputs.json``, written by ``retrain``) and its checkpoint's sha256. Both are compared with the
    current manifest: a figure whose inputs changed is flagged ``stale`` with the files that changed.
    """
    current = shard_inputs(m.get("manifest"))
    out: Dict[str, Dict[str, Any]] = {}
    pm = m.get("pseudo_masks")
    if isinstance(pm, dict):
        recorded = (pm.get("inputs") or {}).get("shards")
        out["pseudo_masks"] = {"figure": "pseudo-mask metrics", "file": str(run.shard_dir / "metrics.json"),
                               "computed_at": pm.get("computed_at") or _mtime_utc(run.shard_dir / "metrics.json"),
                               "inputs": _inputs_text(recorded), "changes": _shard_changes(recorded, current),
                               "fix": "re-run `make pseudo-labels` (it evaluates again)"}
    s2 = m.get("stage2")
    if isinstance(s2, dict):
        rec = _read_json(run.stage2_dir / "inputs.json") or {}
        recorded = rec.get("shards") if isinstance(rec, dict) else None
        ck = s2.get("checkpoint_sha256")
        out["stage2"] = {"figure": "retrained model (stage 2)", "file": str(run.stage2_dir / "metrics.json"),
                         "computed_at": s2.get("computed_at") or _mtime_utc(run.stage2_dir / "metrics.json"),
                         "inputs": f"checkpoint {Path(str(s2.get('checkpoint'))).name}"
                                   f"{f' (sha256 {ck[:8]})' if ck else ''}, trained on {_inputs_text(recorded)}",
                         "changes": _shard_changes(recorded, current),
                         "fix": "move stage2/ aside and re-run `make retrain` to train on the current shards"}
    for entry in out.values():
        changes = entry["changes"]
        entry["stale"] = bool(changes)
        entry["status"] = ("inputs unknown (computed by an older version; no record of its shards)"
                           if changes is None else "current" if not changes else
                           f"STALE: inputs changed since ({'; '.join(changes)}); {entry['fix']}")
    return out


def collect(run: RunDir, cfg: Any) -> Dict[str, Any]:
    """Everything the report shows, as one JSON-able dict (``provenance``: see :func:`_provenance`)."""
    m = _collect_files(run, cfg)
    m["provenance"] = _provenance(run, m)
    return m


def _collect_files(run: RunDir, cfg: Any) -> Dict[str, Any]:
    s1 = run.path / "stage1"
    return {
        "run": str(run.path),
        "dataset": cfg.data.dataset,
        "config_hash": config_hash(cfg),
        "env": _read_json(run.path / "env.json"),
        "stage1_train": _read_json(s1 / "train_summary.json"),
        "stage1_validation": _read_jsonl(s1 / "val_metrics.jsonl"),
        "cams": _read_json(run.cams_dir / "metrics.json"),
        "pseudo_masks": _read_json(run.shard_dir / "metrics.json"),
        "dump": _read_json(run.shard_dir / "dump_summary.json"),
        "manifest": _read_json(run.shard_dir / "manifest.json"),
        "stage2": _read_json(run.stage2_dir / "metrics.json"),
        "stage_costs": _read_json(run.path / "stage_costs.json"),
        "anchors": ANCHORS,
    }


# Validation figures of the WeCLIP head, for validation logs written before heads recorded their figure names.
_LEGACY_FIGURES = {"pseudo": "online pseudo label (CAM+RFM+PAR), last validation",
                   "pseudo_no_rfm": "online pseudo label without RFM (same decoder; ablation)",
                   "decoder": "stage-1 decoder, last validation"}


def _quality_rows(m: Dict[str, Any]) -> List[List[str]]:
    """Rows of (what, split, mIoU, mIoU over classes with ground truth, fwIoU); n/a where not recorded."""
    rows = []
    cams = m.get("cams") or {}
    for k, v in (cams.get("table") or {}).items():
        rows.append([f"initial CAM ({k})", cams.get("split", "?"), _fmt(v), _fmt((cams.get("table_gt") or {}).get(k)),
                     _fmt((cams.get("table_fwiou") or {}).get(k))])
    val = m.get("stage1_validation") or []
    if val:
        last = val[-1]
        # Each head names its validation figures (Stage1Head.FIGURES, recorded with the scores); older logs did not.
        figures = last.get("figures") or {k: v for k, v in _LEGACY_FIGURES.items() if f"{k}_miou" in last}
        for key, label in figures.items():
            rows.append([label, "val", _fmt(last.get(f"{key}_miou")), _fmt(last.get(f"{key}_miou_gt")), "n/a"])
    prov = m.get("provenance") or {}
    stale = {k: " (STALE: inputs changed, see Provenance)" if (v or {}).get("stale") else "" for k, v in prov.items()}
    pm = m.get("pseudo_masks") or {}
    settings = pm.get("dump_settings") or {}
    crf_on = settings.get("crf") is not None  # None when the dump ran without CRF
    if settings.get("training_free"):  # head.type="none": the refined initial CAMs, no model (dump/training_free.py)
        cam = settings.get("cam") or {}
        how = f"{cam.get('source', '?')}{'+PAR' if cam.get('par') else ''}"
        labels = (("no_crf", f"training-free pseudo-masks ({how}), before CRF"),
                  ("final", f"training-free pseudo-masks as written ({how}{'+CRF' if crf_on else ''})"),
                  ("final_confident", "training-free pseudo-masks, confident pixels only"))
    else:
        labels = (("no_crf", "dumped masks, msc+flip, before CRF"),
                  ("final", f"dumped masks as written (msc+flip{'+CRF' if crf_on else ''})"),
                  ("final_confident", "dumped masks, confident pixels only"))
    for key, label in labels:
        if isinstance(pm.get(key), dict):
            r = pm[key]
            rows.append([label + stale.get("pseudo_masks", ""), pm.get("split", "?"), _fmt(r.get("miou")),
                         _fmt(r.get("miou_gt")), _fmt(r.get("fwiou"))])
    s2 = m.get("stage2") or {}
    for key, label in (("single_scale", "retrained, single scale"), ("single_scale_crf", "retrained, single scale+CRF"),
                       ("msc_flip", "retrained, msc+flip"), ("msc_flip_crf", "retrained, msc+flip+CRF")):
        if isinstance(s2.get(key), dict):
            r = s2[key]
            rows.append([label + stale.get("stage2", ""), s2.get("split") or "val", _fmt(r.get("mIoU")),
                         _fmt(r.get("mIoU_gt_classes")), _fmt(r.get("fwIoU"))])
    return rows


QUALITY_HEADER = ["what", "split", "mIoU", "mIoU, GT classes only", "fwIoU"]
QUALITY_NOTE = ("mIoU follows MMSegmentation's IoUMetric: a class predicted but absent from the ground truth counts "
                "as IoU 0. 'GT classes only' averages over the classes with ground-truth pixels, as the WeCLIP and "
                "CLIP-ES evaluation scripts do: the papers' CAM and pseudo-mask figures use it; fwIoU is CLIP-ES's "
                "frequency-weighted IoU. The two mIoUs agree on a full VOC split; on subsets (a short validation, a "
                "missing class) compare the second with the papers.")


def _per_class_rows(m: Dict[str, Any]) -> List[List[str]]:
    """Per class: pseudo-mask IoU / precision / recall and the retrained model's IoU (single scale, msc+flip)."""
    pm = (m.get("pseudo_masks") or {}).get("per_class") or {}
    s2 = m.get("stage2") or {}
    ss = (s2.get("single_scale") or {}).get("per_class_iou") or {}
    ms = (s2.get("msc_flip") or {}).get("per_class_iou") or {}
    names = list(pm) or list(ss)
    return [[c, _fmt((pm.get(c) or {}).get("iou")), _fmt((pm.get(c) or {}).get("precision")),
             _fmt((pm.get(c) or {}).get("recall")), _fmt(ss.get(c)), _fmt(ms.get(c))] for c in names]


PER_CLASS_HEADER = ["class", "pseudo IoU", "pseudo precision", "pseudo recall", "retrained IoU (ss)",
                    "retrained IoU (msc+flip)"]


def _clip_weights(cfg: Any) -> str:
    """Where the CLIP weights came from, as the backbone loader resolves them (file/scheme first, then tag)."""
    if cfg.clip.get("weights"):
        return f"weights `{cfg.clip.weights}`"
    return f"pretrained `{cfg.clip.pretrained}`" if cfg.clip.pretrained else "random init"


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _cost_rows(m: Dict[str, Any]) -> List[List[str]]:
    """Wall time and peak memory per stage: the stages' own summaries, else what the scheduler measured."""
    rows = []
    for key, label in (("stage1_train", "stage-1 training (in-process)"), ("dump", "pseudo-mask dump (in-process)")):
        s = m.get(key) or {}
        if s.get("seconds") is not None:
            mem = s.get("peak_memory_mib")
            rows.append([label, f"{s['seconds']:.0f} s", f"{mem:.0f} MiB" if mem is not None else "n/a",
                         str(s.get("device", "n/a"))])
    for name, c in (m.get("stage_costs") or {}).items():
        rows.append([f"{name} (whole command)", f"{c['seconds']:.0f} s", f"{c['peak_rss_mib']:.0f} MiB peak RSS",
                     "local scheduler"])
    return rows


PROVENANCE_HEADER = ["figures", "computed at (UTC)", "from", "status"]


def _provenance_rows(m: Dict[str, Any]) -> List[List[str]]:
    return [[p["figure"], str(p["computed_at"] or "n/a"), p["inputs"], p["status"]]
            for p in (m.get("provenance") or {}).values()]


def build_report(cfg: Any, run: RunDir) -> Path:
    """Write report.md, metrics.json, index.html and figures; returns the path of index.html."""
    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    m = collect(run, cfg)
    (out / "metrics.json").write_text(json.dumps(m, indent=2, default=str) + "\n")
    figs = _figures(run, cfg, m, out)
    quality = _quality_rows(m)
    provenance = _provenance_rows(m)
    for p in (m.get("provenance") or {}).values():
        if p["stale"]:
            _logger.warning("%s in %s: %s", p["figure"], p["file"], p["status"])
    anchors = [[a["method"], a["what"], f"{a['miou']:.1f}", a["protocol"]] for a in ANCHORS]
    cost = _cost_rows(m)
    env = m.get("env") or {}
    pkgs = env.get("packages") or {}
    env_rows = [[k, str(v)] for k, v in pkgs.items()] + [["git", str(env.get("git_sha"))],
                                                         ["device", str(env.get("device"))],
                                                         ["config hash", m["config_hash"]]]
    md = [f"# WSSS run report: {run.path}", "",
          f"Dataset `{cfg.data.dataset}`, CLIP `{cfg.clip.model_name}` ({_clip_weights(cfg)}), "
          f"CAM `{cfg.cam.source}`, head `{cfg.head.type}`, config hash `{m['config_hash']}`.", "",
          "## Quality (mIoU %)", "", _md_table(QUALITY_HEADER, quality) if quality else "(no metrics yet)", "",
          QUALITY_NOTE, "", "## Provenance", "",
          _md_table(PROVENANCE_HEADER, provenance) if provenance else "(no figures yet)",
          "", "## Per class (%)", "", _md_table(PER_CLASS_HEADER, _per_class_rows(m)),
          "", "## Published anchors (VOC/COCO; not comparable to the synthetic set)", "",
          _md_table(["method", "what", "mIoU", "protocol"], anchors), "", "## Cost", "",
          _md_table(["stage", "time", "peak memory", "device"], cost) if cost else "(no timings)", "",
          "## Environment", "", _md_table(["item", "value"], env_rows), ""]
    md += [f"![{n}]({n})" for n in figs]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def table(header: List[str], rows: List[List[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    imgs = "".join(f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
                   f'{base64.b64encode(b).decode()}"><figcaption>{html.escape(n)}</figcaption></figure>'
                   for n, b in figs.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>WSSS report {html.escape(str(run.path))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}table{{border-collapse:collapse;margin:1em 0;}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;}}img{{max-width:100%;}}</style></head><body>
<h1>WSSS run report</h1><p>{html.escape(str(run.path))} &middot; dataset <b>{html.escape(cfg.data.dataset)}</b>
&middot; config hash <code>{m['config_hash']}</code></p>
<h2>Quality (mIoU %)</h2>{table(QUALITY_HEADER, quality)}<p>{html.escape(QUALITY_NOTE)}</p>
<h2>Provenance</h2>{table(PROVENANCE_HEADER, provenance)}
<h2>Per class (%)</h2>{table(PER_CLASS_HEADER, _per_class_rows(m))}
<h2>Published anchors</h2>{table(["method", "what", "mIoU", "protocol"], anchors)}
<h2>Cost</h2>{table(["stage", "time", "peak memory", "device"], cost)}
<h2>Figures</h2>{imgs}
<h2>Environment</h2>{table(["item", "value"], env_rows)}
<script>window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});</script>
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    _logger.info("report written to %s", index)
    return index
