"""Opening images, for every command: the file checks, the pixel limit, one decode to 8-bit RGB.

Rules shared by ``generate``, the Python API, ``eval`` and the training and CapFilt data:

- Only a regular file is opened: a directory, FIFO or device is refused before anything is read.
- The size comes from the header; an image over ``max_pixels`` (default ``MAX_PIXELS``) is refused before
  its pixels are decoded. Pillow's warnings (its decompression-bomb one included) are not printed, and its
  errors become one line.
- Pixels are decoded once, to 8-bit RGB; 16-bit greyscale keeps its high byte (``v >> 8``), as Pillow does
  for 16-bit colour, instead of saturating at 255.
- EXIF orientation is ignored unless ``exif_transpose`` is set: LAVIS (``Image.open(...).convert("RGB")``)
  ignores it, and the paper's benchmark and training numbers come from the pixels as stored.
  ``blip2 generate`` sets it (``--no-exif-transpose`` to unset): it describes a photo as viewers show it.

Every error is an ``ImageError`` whose one-line message starts with the file's name.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, Union

from .runtime.errors import Blip2Error

if TYPE_CHECKING:
    from PIL import Image

# The most pixels an image may have, for every command. It is Pillow's own threshold (1 GiB of 24-bit
# pixels / 3 / 4), and the area ``blip2 prepare`` refuses above (its recipes' ``max_image_area``).
MAX_PIXELS = 89_478_485

Source = Union[str, os.PathLike, bytes, "Image.Image"]

# Pillow's bomb check reads a module global: it is switched off, under this lock, while we open and decode,
# since our own limit (which may be set above Pillow's) is applied first. Decoding is therefore serial within
# a process; DataLoader workers are processes, each with its own lock.
_PILLOW_LIMIT = threading.RLock()


class ImageError(Blip2Error):
    """An image that cannot be used; the message starts with its name."""


class TooManyPixels(ImageError):
    """An image whose header gives more pixels than the limit."""

    def __init__(self, name: str, size: tuple[int, int], limit: int) -> None:
        self.name, self.size, self.limit = name, size, limit
        width, height = size
        super().__init__(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,}; "
                         "not decoded (a possible decompression bomb)")


def check_header(source: Source, name: str | None = None, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The image's (width, height), reading only its header: a file error, a header Pillow does not know or
    more than ``max_pixels`` pixels is an ``ImageError``. A truncated body passes; a PIL image (in memory
    already) is not limited."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.size
    with _opened(source, _name(source, name), max_pixels) as im:
        return im.size


def open_rgb(source: Source, name: str | None = None, max_pixels: int = MAX_PIXELS,
             exif_transpose: bool = False) -> Image.Image:
    """The image decoded once to 8-bit RGB, after ``check_header``'s checks.

    ``source``: a path, the bytes of an encoded image (``name`` names it in errors) or a PIL image (in memory
    already: only converted, not limited). ``exif_transpose``: turn the image upright by its EXIF orientation.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return to_rgb(_transposed(source.copy()) if exif_transpose else source)
    name = _name(source, name)
    with _opened(source, name, max_pixels) as im:
        try:
            im.load()
            if exif_transpose:
                _transposed(im)
            return to_rgb(im)
        except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, EOFError, ...)
            raise _unreadable(name, e) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: 16- and 32-bit integer greyscale (modes ``I;16*``, ``I``) scaled by ``v >> 8`` (values
    clipped to 0..65535), every other mode (``1``, ``L``, ``LA``, ``P``, ``RGBA``, ``CMYK``, ...) converted
    by Pillow, as LAVIS does."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im).astype(np.int32)
        np.clip(grey, 0, 65535, out=grey)
        grey >>= 8
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "<image bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def _transposed(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF orientation, in place."""
    from PIL import ImageOps

    ImageOps.exif_transpose(im, in_place=True)
    return im


@contextmanager
def _opened(source: Source, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image with only its header read, once it is known to be within ``max_pixels``."""
    from PIL import Image

    with _stream(source, name) as fp, _quiet_pillow():
        try:
            im = Image.open(fp)
        except Exception as e:  # a hostile header raises almost anything
            raise _unreadable(name, e) from None
        if im.width * im.height > max_pixels:
            raise TooManyPixels(name, im.size, max_pixels)
        yield im  # not closed: a decoded image must outlive its file, which closes here


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's decompression-bomb check off (``max_pixels`` is the limit) and its warnings unprinted
    (a bomb, a palette's transparency, odd EXIF): what matters is raised as one line instead."""
    from PIL import Image

    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _stream(source: Source, name: str) -> IO[bytes]:
    """A binary stream over the encoded image: the bytes, or the file once it is known to be a regular one."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    path = os.fspath(source)
    _check_regular(_stat(os.stat, path, name), name)
    try:  # non-blocking: a FIFO put in the file's place since the stat cannot hang the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _file_error(name, e) from None
    fp = os.fdopen(fd, "rb")
    try:
        _check_regular(_stat(os.fstat, fd, name), name)
    except ImageError:
        fp.close()
        raise
    return fp


def _stat(how: Callable[[Any], os.stat_result], target: str | int, name: str) -> os.stat_result:
    """``how(target)``: ``os.stat`` of a path or ``os.fstat`` of a descriptor; a failure names the file."""
    try:
        return how(target)
    except OSError as e:
        raise _file_error(name, e) from None


def _check_regular(info: os.stat_result, name: str) -> None:
    """Refuse what is not a regular file: reading a FIFO or a device may block or never end."""
    if stat.S_ISREG(info.st_mode):
        return
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((k for test, k in kinds if test(info.st_mode)), "something other than a regular file")
    raise ImageError(f"{name}: is {kind}, not an image file")


def _file_error(name: str, error: OSError) -> ImageError:
    if isinstance(error, FileNotFoundError):
        return ImageError(f"{name}: no such file")
    if isinstance(error, IsADirectoryError):
        return ImageError(f"{name}: is a directory, not an image file")
    return ImageError(f"{name}: cannot read ({error.strerror or type(error).__name__})")


def _unreadable(name: str, error: Exception) -> ImageError:
    """The one-line error for a file Pillow could not open or decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, ImageError):
        return error
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, UnidentifiedImageError):
        return ImageError(f"{name}: not an image file (or a format Pillow cannot read)")
    if isinstance(error, Image.DecompressionBombError):  # a frame larger than the header said
        return ImageError(f"{name}: too many pixels to decode safely ({detail})")
    if isinstance(error, OSError) and error.filename is not None:  # reading the file failed, not decoding it
        return ImageError(f"{name}: cannot read ({error.strerror or detail})")
    return ImageError(f"{name}: corrupt or truncated image ({detail})")


__all__ = ["MAX_PIXELS", "ImageError", "TooManyPixels", "check_header", "open_rgb", "to_rgb"]
