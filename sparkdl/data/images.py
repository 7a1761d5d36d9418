"""[any] Image bytes → uint8 pixel arrays with Pillow: the part of ``decode_images`` that runs
in its decoding processes, so it imports Pillow and numpy only (no torch)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparkdl.errors import DataError

__all__ = ["decode_some", "decode_stacked"]


def decode_some(images: Sequence[bytes], first: int, size: Any, mode: str) -> list[np.ndarray]:
    """Each image as a uint8 ``[H, W, C]`` (``[H, W]`` for one-band modes) array, converted to
    ``mode`` and resized to ``size`` = (H, W) when given; ``first``: the position of
    ``images[0]`` in the caller's batch, for the DataError naming an image that does not
    decode."""
    from PIL import Image

    arrays = []
    for i, data in enumerate(images, start=first):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(mode)
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(image, dtype=np.uint8))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"images[{i}] must be an image Pillow can decode, got {type(exc).__name__}: "
                f"{exc}. Check the column holds encoded images (PNG, JPEG)."
            ) from exc
    return arrays


def decode_stacked(images: Sequence[bytes], first: int, size: Any, mode: str) -> Any:
    """:func:`decode_some` stacked into one uint8 array ``[n, H, W(, C)]`` (one object to send
    back from a decoding process), or the list when the images' sizes differ (the caller
    names them)."""
    arrays = decode_some(images, first, size, mode)
    if not arrays or len({a.shape for a in arrays}) > 1:
        return arrays
    return np.stack(arrays)
