"""The preview of a run folder: a montage of the first samples, volumes in radiological orientation.

Volumes are canonical ``(D, H, W)`` arrays (:func:`invcoss.data.read_nifti`, RAS+): the index
along ``D`` grows towards the head (superior), along ``H`` towards the front (anterior) and along
``W`` towards the patient's right. Shown as it is, an axial slice ``array[k]`` would put posterior
at the top and the patient's left on the viewer's left (the slice seen from above, upside down).
Radiological convention looks at an axial slice from the feet: anterior at the top and the
patient's right on the viewer's left (the patient's left on the viewer's right). That is the
array turned by 180 degrees, ``array[k, ::-1, ::-1]`` (:func:`radiological_axial`).

Each tile of a 3D preview has a white frame with the directions marked in letters: ``A``
(anterior) above, ``P`` (posterior) below, ``R`` (the patient's right) on the left and ``L`` on
the right. 2D images (X-ray, pathology) are shown as stored, unmarked: a picture carries no patient
orientation, and radiographs are stored the way they are read.

Example:
    >>> x = np.zeros((1, 1, 4, 8, 8), np.float32)   # (K, C, D, H, W)
    >>> x[0, 0, :, -2:, :2] = 1                     # anterior and on the patient's left
    >>> s = radiological_axial(x)[0, 0]
    >>> bool(s[:2, -2:].all()), float(s.sum())      # top right of the view
    (True, 4.0)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["AXIAL_MARKS", "GLYPHS", "montage", "radiological_axial"]

# 5x7 capitals, drawn here so the same preview has the same bytes on every machine (a font would not).
GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
}
AXIAL_MARKS = {"top": "A", "bottom": "P", "left": "R", "right": "L"}
"""The letters on the edges of a radiological axial slice."""
_GAP = 2  # pixels between tiles


def radiological_axial(x: np.ndarray) -> np.ndarray:
    """The central axial slice of every volume, in radiological orientation.

    Args:
        x: ``(K, C, D, H, W)`` canonical volumes (see the module docstring).

    Returns:
        ``(K, C, H, W)``: row 0 the anterior edge, column 0 the patient's right.
    """
    return np.ascontiguousarray(x[:, :, x.shape[2] // 2, ::-1, ::-1])


def _glyph(letter: str, scale: int) -> np.ndarray:
    rows = GLYPHS[letter]
    g = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return np.kron(g, np.ones((scale, scale), dtype=bool))


def montage(images: np.ndarray, marks: dict[str, str] | None = None) -> np.ndarray:
    """Tiles of ``images`` ``(K, C, H, W)`` in [0, 1] on a white canvas, rows of ``ceil(sqrt(K))``.

    With ``marks`` (``{"top": "A", "bottom": "P", "left": "R", "right": "L"}``), every tile gets a
    white frame as wide as a letter with the letters in black at the middle of its edges (5x7 pixel
    letters, doubled from tiles of 64 pixels on).

    Returns:
        ``(C, rows, cols)`` float32.
    """
    k, c, h, w = images.shape
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    scale = 2 if min(h, w) >= 64 else 1
    band = (7 * scale + 2 * scale) if marks else 0  # the letter's height and a margin each side
    th, tw = h + 2 * band, w + 2 * band
    canvas = np.ones((c, rows * (th + _GAP) - _GAP, cols * (tw + _GAP) - _GAP), dtype=np.float32)
    for i in range(k):
        r, q = divmod(i, cols)
        top, left = r * (th + _GAP), q * (tw + _GAP)
        canvas[:, top + band : top + band + h, left + band : left + band + w] = images[i]
        for edge, letter in (marks or {}).items():
            g = _glyph(letter, scale)
            gh, gw = g.shape
            y = {"top": top + scale, "bottom": top + band + h + scale}.get(edge, top + band + (h - gh) // 2)
            x = {"left": left + (band - gw) // 2, "right": left + band + w + (band - gw) // 2}.get(
                edge, left + band + (w - gw) // 2
            )
            canvas[:, y : y + gh, x : x + gw][:, g] = 0.0
    return canvas
