"""Reading an uploaded query image: size-limited while it arrives, checked before it is decoded.

Two ways to send one: a multipart form with a file field (what browsers send; the page uses
``image``), or the raw bytes as the body with an ``image/*`` Content-Type (what ``curl
--data-binary`` sends). Either way the body is counted as it streams in and refused with 413
the moment it passes the limit, so an oversized upload is never held in memory or on disk.
"""

from __future__ import annotations

import io
import warnings
from typing import AsyncIterator

from PIL import Image, UnidentifiedImageError

from ..images import MAX_ASPECT, ImageInputError, check_shape, load_image
from .problems import RequestProblem

FIELD = "image"
RAW_TYPES = ("image/", "application/octet-stream")
# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_SLACK = 16 << 10


def too_large(limit: int) -> RequestProblem:
    return RequestProblem(413, f"the upload is larger than this server's limit of {limit / (1 << 20):g} MB")


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise too_large(limit - MULTIPART_SLACK if limit > MULTIPART_SLACK else limit)
        yield chunk


async def read_upload(request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and a name for messages; 4xx for anything else."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large(limit)  # refused before a byte of the body is read
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        data, name = await _from_form(request, limit)
    elif content_type.startswith(RAW_TYPES):
        data = b"".join([chunk async for chunk in _limited(request.stream(), limit)])
        name = "upload"
    else:
        raise RequestProblem(415, "send the image as multipart/form-data (field `image`) or as the request "
                                  "body with an image/* Content-Type")
    if not data:
        raise RequestProblem(400, "the uploaded file is empty")
    return data, name


async def _from_form(request, limit: int) -> tuple[bytes, str]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(request.headers, _limited(request.stream(), limit + MULTIPART_SLACK),
                             max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestProblem(400, f"malformed multipart upload: {exc.message}") from None
    try:
        upload = form.get(FIELD)
        if not isinstance(upload, UploadFile):
            upload = next((value for _, value in form.multi_items() if isinstance(value, UploadFile)), None)
        if upload is None:
            raise RequestProblem(400, f"the form has no file; send the image in the `{FIELD}` field")
        data = await upload.read()
        if len(data) > limit:
            raise too_large(limit)
        return data, upload.filename or "upload"
    finally:
        await form.close()


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The uploaded image, upright and RGB: 415 if it is no image, 413 if it has too many pixels,
    422 for a shape no photo has (beyond ``images.MAX_ASPECT``), 400 if its pixels are unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                width, height = probe.size
    except UnidentifiedImageError:
        raise RequestProblem(415, f"{name} is not an image file this server can read "
                                  f"(JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise RequestProblem(413, f"{name} has more pixels than this server accepts ({max_pixels})") from None
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, struct.error...: the bytes' fault, not ours
        raise RequestProblem(400, f"{name} is an unreadable image ({exc})") from None
    if width * height > max_pixels:
        raise RequestProblem(413, f"{name} is {width}x{height}, more than this server's limit of "
                                  f"{max_pixels} pixels")
    shape = check_shape(width, height, max_pixels)
    if shape:  # a thin strip: refused from the header, before a pixel is decoded
        raise RequestProblem(422, f"{name}: {shape}; crop it to at most {MAX_ASPECT:g}:1")
    try:
        return load_image(data, max_pixels=max_pixels, name=name)
    except ImageInputError as exc:  # truncated or corrupt pixel data
        raise RequestProblem(400, str(exc)) from None
