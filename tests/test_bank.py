"""ExCEL's attribute bank (TSE): clustering is deterministic and cached in the run directory, released banks load
and are checked, class names must match, and the synthetic world describes every class (stage1_cam/cams/bank.py,
stage1_cam/data/descriptions.py)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage1_cam.cams import bank as bank_mod
from stage1_cam.cams.bank import attribute_bank_for, cached_attribute_bank, load_bank_file, main, match_classes
from stage1_cam.config import load_config
from stage1_cam.data.class_names import CLASSES, PROMPT_NAMES
from stage1_cam.data.descriptions import (COLOUR_NAMES, synthetic_descriptions, write_synthetic_descriptions)
from stage1_cam.data.synthetic import CLASS_STYLES
from stage1_cam.utils.cli import BadInputError
from tests.cli_errors import error_lines

pytest.importorskip("sklearn")

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"
K = 16  # small: fast KMeans (ExCEL's 112 works the same way)


def _cfg(tmp_path: Path, descriptors, k: int = K, run: str = "r"):
    return load_config(TINY, {"run.root": str(tmp_path / "runs"), "run.name": run, "cam.source": "excel_svc",
                              "cam.descriptors": str(descriptors), "cam.num_attributes": k})


@pytest.fixture
def desc_file(tmp_path):
    return write_synthetic_descriptions(tmp_path / "synthetic_descriptions.json")


# ------------------------------------------------------------------------------------------ synthetic world
def test_synthetic_descriptions_cover_every_foreground_class():
    from stage1_cam.models.text import get_tokenizer

    desc = synthetic_descriptions()
    assert list(desc) == list(CLASSES["synthetic"][1:])
    sentences = [s for v in desc.values() for s in v]
    assert len(set(sentences)) == len(sentences) >= 112  # enough for ExCEL's VOC k
    for (name, sents), prompt, style in zip(desc.items(), PROMPT_NAMES["synthetic"], CLASS_STYLES):
        assert len(sents) >= 10, name
        assert all(s.startswith(f"a clean origami {prompt}. ") for s in sents)
        text = " ".join(sents)
        texture = {"stripes": "striped", "checker": "checkered", "dots": "dotted", "rings": "ringed",
                   "grid": "gridded", "solid": "plain"}[style.texture]
        shape = {"ellipse": "oval"}.get(style.shape, style.shape)
        assert COLOUR_NAMES[style.colour] in text and texture in text and shape in text, name
    assert len(set(COLOUR_NAMES[s.colour] for s in CLASS_STYLES)) == len(CLASS_STYLES)
    # nothing is cut by the world CLIP's 32-token context
    ids = get_tokenizer("wsss-world-ViT-16")(sentences)
    assert ids.shape[1] == 32 and not bool((ids[:, -1] != 0).any())


def test_write_synthetic_descriptions_never_overwrites(tmp_path):
    path = write_synthetic_descriptions(tmp_path / "d.json")
    assert write_synthetic_descriptions(path) == path  # same content: kept
    other = tmp_path / "other.json"
    other.write_text("{}")
    with pytest.raises(BadInputError, match="other.json exists"):
        write_synthetic_descriptions(other)
    assert other.read_text() == "{}"


# ----------------------------------------------------------------------------------------------- the cache
def test_bank_is_deterministic_and_cached(tmp_path, desc_file, tiny_clip, monkeypatch, caplog):
    import sklearn.cluster

    cfg = _cfg(tmp_path, desc_file)
    real_kmeans, settings = sklearn.cluster.KMeans, []

    def kmeans(*a, **k):
        settings.append(k)
        return real_kmeans(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sklearn.cluster, "KMeans", kmeans)
        first = cached_attribute_bank(cfg, tiny_clip)
    # every setting that decides the clusters is given, not left to scikit-learn's defaults of the day
    assert settings == [{"n_clusters": K, "random_state": 0, "n_init": 1}]
    assert first.source == "built" and first.path.parent == tmp_path / "runs" / "synthetic" / "r" / "bank"
    assert first.bank.shape == (64, K) and first.membership.shape == (20, K)
    assert torch.equal(first.membership.sum(0), torch.ones(K))
    recorded = json.loads(first.path.with_suffix(".json").read_text())
    assert (recorded["k"], recorded["seed"], recorded["n_init"]) == (K, 0, 1)
    # the same inputs in a fresh run directory cluster to identical tensors
    again = cached_attribute_bank(_cfg(tmp_path, desc_file, run="fresh"), tiny_clip)
    assert again.source == "built" and again.path.name == first.path.name
    assert torch.equal(again.bank, first.bank) and torch.equal(again.membership, first.membership)

    # a second call loads the cache: no KMeans
    def no_kmeans(*a, **k):
        raise AssertionError("KMeans ran although the bank is cached")

    monkeypatch.setattr(sklearn.cluster, "KMeans", no_kmeans)
    mtime = first.path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="stage1_cam"):
        cached = cached_attribute_bank(cfg, tiny_clip)
    assert cached.source == "cache" and cached.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert torch.equal(cached.bank, first.bank) and torch.equal(cached.membership, first.membership)
    assert any("loaded the cached" in r.getMessage() for r in caplog.records)
    assert torch.equal(attribute_bank_for(cfg, tiny_clip), first.bank)
    # the JSON's formatting and key order are not its content
    data = json.loads(desc_file.read_text())
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(dict(reversed(list(data.items())))))
    assert cached_attribute_bank(_cfg(tmp_path, shuffled), tiny_clip).path == first.path


def test_other_descriptions_or_k_make_another_file(tmp_path, desc_file, tiny_clip):
    cfg = _cfg(tmp_path, desc_file)
    first = cached_attribute_bank(cfg, tiny_clip)
    before = first.path.read_bytes()
    data = json.loads(desc_file.read_text())
    data["cat"][0] = data["cat"][0].replace("shaped like", "cut like")
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    other_text = cached_attribute_bank(_cfg(tmp_path, changed), tiny_clip)
    other_k = cached_attribute_bank(_cfg(tmp_path, desc_file, k=K + 1), tiny_clip)
    assert other_text.source == other_k.source == "built"
    assert len({first.path, other_text.path, other_k.path}) == 3
    assert other_k.bank.shape == (64, K + 1)
    assert first.path.read_bytes() == before  # nothing overwritten
    # another CLIP (the clip section: model, weights and their identity, precision) is another key
    desc = match_classes(data, CLASSES["synthetic"][1:], "x")
    cfg_fp16 = load_config(TINY, {"clip.precision": "fp16"})
    assert bank_mod.bank_key(desc, bank_mod.clip_identity(cfg), K) != \
        bank_mod.bank_key(desc, bank_mod.clip_identity(cfg_fp16), K)


def test_main_builds_then_loads(tmp_path, desc_file, capsys):
    argv = [TINY, "--descriptions", str(desc_file), "--run", "m", "-k", str(K),
            "--cfg-options", f"run.root={tmp_path / 'runs'}"]
    assert main(argv) == 0
    assert "attribute bank (built)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "attribute bank (cache)" in capsys.readouterr().out
    assert len(list((tmp_path / "runs" / "synthetic" / "m" / "bank").glob("*.pth"))) == 1


def test_main_write_synthetic(tmp_path, capsys):
    out = tmp_path / "desc.json"
    assert main([TINY, "--descriptions", str(out), "--write-synthetic", "-k", str(K),
                 "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 0
    assert json.loads(out.read_text()) == synthetic_descriptions()


# --------------------------------------------------------------------------------------------- bad inputs
def test_class_name_mismatch_is_refused(tmp_path, desc_file, tiny_clip, caplog, capfd):
    data = json.loads(desc_file.read_text())
    # names are compared without case, spaces, '_' and '-'
    lenient = {("dining table" if k == "diningtable" else "Potted_Plant" if k == "pottedplant" else k): v
               for k, v in data.items()}
    assert list(match_classes(lenient, CLASSES["synthetic"][1:], "f")) == list(CLASSES["synthetic"][1:])
    data.pop("sheep")
    data["unicorn"] = ["a clean origami unicorn."]
    bad = tmp_path / "bad_classes.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"bad_classes.json.*missing sheep.*not classes of the dataset: unicorn"):
        cached_attribute_bank(_cfg(tmp_path, bad), tiny_clip)
    rc = main([TINY, "--descriptions", str(bad), "--cfg-options", f"run.root={tmp_path / 'runs'}"])
    assert rc == 2
    (msg,) = error_lines(caplog, capfd)
    assert "bad_classes.json" in msg and "sheep" in msg and "unicorn" in msg
    assert not (tmp_path / "runs" / "synthetic" / "demo" / "bank").exists()


def test_released_format_loads(tmp_path, tiny_clip, capsys):
    bank, membership = torch.randn(64, 112), torch.zeros(20, 112)
    membership[torch.arange(112) % 20, torch.arange(112)] = 1.0
    path = tmp_path / "voc_embedding_bank.pth"
    torch.save([bank, membership], path)
    got, got_m = load_bank_file(path, embed_dim=64, num_classes=20)
    assert torch.equal(got, bank) and torch.equal(got_m, membership)
    cfg = _cfg(tmp_path, path, k=112)
    assert torch.equal(attribute_bank_for(cfg, tiny_clip), bank)
    assert main([TINY, "--descriptions", str(path), "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 0
    assert "attribute bank (file)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # a released bank is read in place


@pytest.mark.parametrize("content,expect", [
    ([torch.randn(112, 64), torch.zeros(20, 112)], "looks transposed"),
    ([torch.randn(512, 112), torch.zeros(20, 112)], "E=64"),
    ([torch.randn(64, 112), torch.zeros(19, 112)], "19 class rows"),
    ([torch.randn(64, 112), torch.zeros(20, 100)], r"expected \(C, 112\)"),
    ({"bank": torch.randn(64, 112)}, "holds a dict"),
    ([torch.randn(64, 112)], "holds a list of 1"),
    ([torch.full((64, 112), float("nan")), torch.zeros(20, 112)], "NaN"),
    (b"not a torch file", "cannot be read by torch.load"),
], ids=["transposed", "other-clip", "classes", "membership-k", "dict", "one-tensor", "nan", "garbage"])
def test_wrong_bank_file_exits_2_naming_it(content, expect, tmp_path, caplog, capfd):
    path = tmp_path / "wrong_embedding_bank.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert main([TINY, "--descriptions", str(path)]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert "wrong_embedding_bank.pth" in msg and re.search(expect, msg), msg


def test_too_few_sentences_and_missing_file_exit_2(tmp_path, desc_file, caplog, capfd):
    assert main([TINY, "--descriptions", str(tmp_path / "nope.json")]) == 2
    assert main([TINY, "--descriptions", str(desc_file), "-k", "500",
                 "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 2
    msgs = error_lines(caplog, capfd)
    assert "nope.json not found" in msgs[0] and "240 sentences, fewer than the 500" in msgs[1]


def test_package_import_leaves_the_command_module_alone():
    """``python -m stage1_cam.cams.bank`` would warn if importing the package had imported it already."""
    code = ("import sys, stage1_cam.cams; assert 'stage1_cam.cams.bank' not in sys.modules; "
            "from stage1_cam.cams.attributes import build_attribute_bank, load_attribute_bank, load_descriptions; "
            "from stage1_cam.cams import bank; assert bank.load_descriptions is load_descriptions")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
