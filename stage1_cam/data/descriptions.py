"""Class descriptions of the synthetic world, for ExCEL's text semantic enrichment (TSE, reference_spec 4.4).

ExCEL clusters LLM-written sentences about each class into an attribute bank. The synthetic world needs no LLM:
its generator (:data:`~stage1_cam.data.synthetic.CLASS_STYLES`) knows each class's shape family, colour and
texture, so :func:`synthetic_descriptions` writes those down, in ExCEL's format: ``{class: [sentences]}``, each
sentence starting with the prompt (``'a clean origami <prompt name>.'``) followed by one attribute sentence.

The world CLIP (:mod:`stage1_cam.world_clip`) is trained on the pipeline's 45 prompts only (the prompt names and
background words in the template): the attribute words (colours, shapes, textures) are in its tokenizer's BPE
vocabulary but its text tower never saw them, so on the world only the class-name prefix of each sentence carries
meaning. The sentences are true of the rendered objects, and meaningful to a CLIP that knows English.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple, Union

from ..utils.cli import BadInputError
from ..utils.files import atomic_write_text
from .class_names import CLASSES, PROMPT_NAMES
from .synthetic import CLASS_STYLES, ClassStyle

DEFAULT_TEMPLATE = "a clean origami {}."  # the pipeline's prompt template (ExCEL's sentences start with it)

# Kelly's contrast colours used by CLASS_STYLES, by their ISCC-NBS names.
COLOUR_NAMES: Dict[Tuple[int, int, int], str] = {
    (242, 243, 244): "white", (34, 34, 34): "black", (243, 195, 0): "yellow", (135, 86, 146): "purple",
    (243, 132, 0): "orange", (161, 202, 241): "light blue", (190, 0, 50): "red", (194, 178, 128): "buff",
    (132, 132, 130): "gray", (0, 136, 86): "green", (230, 143, 172): "purplish pink", (0, 103, 165): "blue",
    (249, 147, 121): "yellowish pink", (96, 78, 151): "violet", (246, 166, 0): "orange yellow",
    (179, 68, 108): "purplish red", (220, 211, 0): "greenish yellow", (136, 45, 23): "reddish brown",
    (141, 182, 0): "yellow green", (101, 69, 34): "yellowish brown",
}

# shape family -> (noun with article, noun, what distinguishes it)
_SHAPES: Dict[str, Tuple[str, str, str]] = {
    "triangle": ("a triangle", "triangle", "three straight sides and a sharp corner on top"),
    "ring": ("a ring", "ring", "a round hole in its middle"),
    "star": ("a star", "star", "five sharp points"),
    "trapezoid": ("a trapezoid", "trapezoid", "a narrow top and a wide base"),
    "rectangle": ("a rectangle", "rectangle", "four straight sides and right angles"),
    "hexagon": ("a hexagon", "hexagon", "six equal sides"),
    "ellipse": ("an oval", "oval", "a smooth rounded outline"),
    "diamond": ("a diamond", "diamond", "four corners pointing up, down and sideways"),
    "cross": ("a cross", "cross", "two crossing bars of equal length"),
    "crescent": ("a crescent", "crescent", "a curved body like a moon"),
}
# texture family -> (adjective, "covered with ..." phrase without size)
_TEXTURES: Dict[str, Tuple[str, str]] = {
    "stripes": ("striped", "stripes"),
    "checker": ("checkered", "a checkerboard pattern"),
    "dots": ("dotted", "polka dots"),
    "rings": ("ringed", "concentric rings"),
    "grid": ("gridded", "a grid of lines"),
    "solid": ("plain", "smooth shading and no pattern"),
}


def _a(phrase: str) -> str:
    """``phrase`` with its indefinite article."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _luma(rgb: Tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _texture_phrase(style: ClassStyle) -> str:
    """What covers the object, with the texture's scale (and the stripes' direction)."""
    phrase = _TEXTURES[style.texture][1]
    if style.texture == "solid":
        return phrase
    size = "fine" if style.cycles >= 5 else "coarse" if style.cycles <= 3 else ""
    if style.texture == "stripes":
        # The generator's stripes vary along the direction at `angle` degrees: 0 gives vertical bands.
        direction = {0: "vertical", 90: "horizontal"}.get(int(style.angle) % 180, "diagonal")
        size = {"fine": "thin", "coarse": "wide"}.get(size, "")
        return " ".join(w for w in (size, direction, phrase) if w)
    return " ".join(w for w in (size, phrase) if w)


def describe_style(style: ClassStyle) -> List[str]:
    """Attribute sentences (without the class prefix) of one class style: shape, colour, texture, combined."""
    if style.colour not in COLOUR_NAMES:
        raise KeyError(f"no colour name for {style.colour}; add it to COLOUR_NAMES")
    a_shape, shape, feature = _SHAPES[style.shape]
    colour = COLOUR_NAMES[style.colour]
    adj = _TEXTURES[style.texture][0]
    texture = _texture_phrase(style)
    shade = "a darker" if _luma(style.colour) > 110 else "a lighter"  # synthetic._second_colour's rule
    return [
        f"it is shaped like {a_shape}.",
        f"its outline is {a_shape}.",
        f"it has {feature}.",
        f"it is mostly {colour}.",
        f"its main colour is {colour}.",
        f"its pattern mixes {colour} with {shade} shade of it.",
        f"it is covered with {texture}.",
        f"it has {_a(adj)} surface.",
        f"{_a(colour)} {shape} with {texture}.",
        f"it looks like {_a(adj)} {colour} {shape}.",
        f"it is {a_shape} painted {colour}.",
        f"seen from above it is {_a(colour)} {shape}.",
    ]


def synthetic_descriptions(template: str = DEFAULT_TEMPLATE) -> Dict[str, List[str]]:
    """``{class name: [sentences]}`` for every foreground class of the synthetic world (VOC names, label order).

    Each sentence is the class prompt (``template`` filled with the class's prompt name, the words the world CLIP
    was trained on) followed by one attribute sentence from :func:`describe_style`; 12 sentences per class.
    """
    if template.count("{}") != 1:
        raise BadInputError(f"template {template!r} must contain exactly one '{{}}'")
    names = CLASSES["synthetic"][1:]
    prompts = PROMPT_NAMES["synthetic"]
    return {name: [f"{template.format(prompt)} {s}" for s in describe_style(style)]
            for name, prompt, style in zip(names, prompts, CLASS_STYLES)}


def write_synthetic_descriptions(path: Union[str, Path], template: str = DEFAULT_TEMPLATE) -> Path:
    """Write :func:`synthetic_descriptions` as JSON to ``path`` (atomically).

    An existing file with the same content is kept; one with other content is refused (never overwritten).

    Raises:
        BadInputError: ``path`` exists and holds something else.
    """
    path = Path(path)
    text = json.dumps(synthetic_descriptions(template), indent=2) + "\n"
    if path.exists():
        try:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise BadInputError(f"{path} exists and is not the synthetic world's descriptions file; delete it or "
                                f"choose another path for --descriptions (it is never overwritten)")
        return path
    atomic_write_text(path, text)
    return path


__all__ = ["COLOUR_NAMES", "DEFAULT_TEMPLATE", "describe_style", "synthetic_descriptions",
           "write_synthetic_descriptions"]
