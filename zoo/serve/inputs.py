"""Turn request bodies into the in-memory inputs ``FusionModel.predict`` takes, within per-request limits.

Uploads stay in memory from the socket to the model: multipart bodies are parsed here into ``bytes`` (no
spooled temporary files), images are decoded by Pillow from ``BytesIO``, audio by soundfile from ``BytesIO``.
No input ever becomes a file path or reaches a shell. Size limits are checked before the expensive decode:
pixels from the image header, audio frames read at most up to the limit. Errors are in plain words for the
page and for people ("the image of items[2] is not valid base64"), never a library's object reprs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from encoders._image_io import draft, to_rgb
from fusion_errors import InputError

__all__ = ["Limits", "LimitError", "parse_multipart", "parse_urlencoded", "parse_json", "parse_json_sample",
           "decode_sample", "MODALITIES"]

MODALITIES = ("text", "image", "audio")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MAX_JSON_DIGITS = 100  # longest number a JSON body may hold (Python refuses ints over 4,300 digits with a ValueError)
_KINDS = {"str": "a string", "int": "a number", "float": "a number", "bool": "true/false", "list": "a list",
          "dict": "an object", "NoneType": "null"}
_REPR = re.compile(r"(Error opening )?<[^<>]* at 0x[0-9a-fA-F]+>:?\s*")


def _kind(value: Any) -> str:
    """The JSON kind of a parsed value, in words ("a number", "a list")."""
    return _KINDS.get(type(value).__name__, type(value).__name__)


def _plain(e: BaseException) -> str:
    """A library's error message without object reprs ("Error opening <_io.BytesIO object at 0x...>: ")."""
    return _REPR.sub("", str(e)).strip() or type(e).__name__


def _names(names: list[str], most: int = 5) -> str:
    """User-chosen names as a message shows them: each cut to 24 characters, at most ``most`` of them."""
    shown = [repr(n if len(n) <= 24 else n[:21] + "...") for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _part(where: str, key: str) -> str:
    """How a message names one input: "the image" of a single request, "the image of items[2]" in a batch."""
    return f"the {key}" if where == "body" else f"the {key} of {where}"


def _whole(where: str) -> str:
    return "the body" if where == "body" else where


class LimitError(InputError):
    """An input is over a size limit of the server (HTTP 413); the message names the limit and its option."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each names the ``fusion-zoo serve`` option that changes it."""

    max_request_bytes: int = 20 * 1024 * 1024  # --max-request-mb
    max_image_pixels: int = 4096 * 4096  # --max-image-pixels
    max_audio_seconds: float = 30.0  # --max-audio-seconds
    max_text_chars: int = 5000  # --max-text-chars
    max_batch_items: int = 64  # --max-batch-items

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# body parsing --------------------------------------------------------------------------------
def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes | str]:
    """A ``multipart/form-data`` body -> ``{field name: raw bytes}`` (files and plain fields alike), in memory."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("multipart body without a boundary in its Content-Type; let the HTTP client build the "
                         "form (e.g. curl -F text=... -F image=@file.png).")
    parts: list[tuple[bytes, bytearray]] = []
    header: dict[str, bytearray] = {"name": bytearray(), "value": bytearray()}
    disposition = bytearray()

    def on_part_begin() -> None:
        disposition.clear()
        parts.append((b"", bytearray()))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["name"].extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"].extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header["name"]).lower() == b"content-disposition":
            disposition[:] = header["value"]
        header["name"].clear()
        header["value"].clear()

    def on_headers_finished() -> None:
        _, opts = parse_options_header(bytes(disposition))
        parts[-1] = (opts.get(b"name", b""), parts[-1][1])

    callbacks: Any = {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                      "on_header_field": on_header_field, "on_header_value": on_header_value,
                      "on_header_end": on_header_end, "on_headers_finished": on_headers_finished}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise InputError(f"the multipart body is malformed ({_plain(e)}); send fields text, image, audio as "
                         "multipart/form-data.") from e
    out: dict[str, bytes | str] = {}
    for raw_name, data in parts:
        name = raw_name.decode("utf-8", "replace")
        if name not in MODALITIES:
            raise InputError(f"unknown form field {_names([name])}; this endpoint takes the fields "
                             f"{', '.join(MODALITIES)} (text as a field, image and audio as files).")
        if name in out:
            raise InputError(f"form field {_names([name])} is given twice; send one {name} per request "
                             "(POST /predict/batch takes several samples).")
        out[name] = bytes(data)
    return out


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string, not {_kind(value)}; e.g. "
                         f"base64.b64encode(open(file, 'rb').read()).decode().")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # a data: URL as browsers write it
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{what} is not valid base64 (letters, digits, + and / in groups of 4, = padding); send "
                         "the file's bytes base64-encoded (or upload it as multipart/form-data).") from e


def parse_json_sample(obj: Any, where: str = "body") -> dict[str, bytes | str]:
    """One JSON sample ``{"text": str, "image": base64, "audio": base64}`` -> ``{modality: str | bytes}``."""
    if not isinstance(obj, dict):
        raise InputError(f"{_whole(where)} must be a JSON object like {{\"text\": \"...\", \"image\": "
                         f"\"<base64>\"}}, not {_kind(obj)}.")
    unknown = sorted(set(obj) - set(MODALITIES))
    if unknown:
        raise InputError(f"{_whole(where)} has unknown key(s) {_names(unknown)}; the keys are {', '.join(MODALITIES)} "
                         "(image and audio as base64 strings).")
    out: dict[str, bytes | str] = {}
    for key, value in obj.items():
        if value is None:
            continue
        if key == "text":
            if not isinstance(value, str):
                raise InputError(f"{_part(where, 'text')} must be a string, not {_kind(value)}.")
            out[key] = value
        else:
            out[key] = _b64(value, _part(where, key))
    return out


def parse_urlencoded(body: bytes) -> dict[str, bytes | str]:
    """An ``application/x-www-form-urlencoded`` body (``curl -d text=...``) -> a sample; image/audio as base64."""
    from urllib.parse import parse_qs

    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError as e:
        raise InputError(f"the form body is not UTF-8 text (byte {e.start + 1} is not); send UTF-8 text.") from e
    twice = sorted(k for k, v in fields.items() if len(v) > 1)
    if twice:
        raise InputError(f"form field(s) {_names(twice)} given twice; send one of each (POST /predict/batch takes "
                         "several samples).")
    return parse_json_sample({k: v[0] for k, v in fields.items()}, "body")


def _number(text: str) -> float | int:
    if len(text) > MAX_JSON_DIGITS:
        raise InputError(f"the body holds a number of {len(text)} characters; no input is a number that long (the "
                         f"limit is {MAX_JSON_DIGITS}); send text as a string and files as base64.")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _constant(name: str) -> Any:
    raise InputError(f"the body holds {name}, which is not JSON; send text as a string and files as base64.")


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; malformed JSON, NaN/Infinity, numbers over ``MAX_JSON_DIGITS`` characters and bodies
    nested beyond Python's recursion limit are each an :class:`InputError` in plain words."""
    try:
        return json.loads(body, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise InputError(f"the body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); send "
                         "{\"text\": \"...\", \"image\": \"<base64>\", \"audio\": \"<base64>\"}.") from e
    except UnicodeDecodeError as e:
        raise InputError(f"the body is not UTF-8 text (byte {e.start + 1} is not); send JSON in UTF-8.") from e
    except RecursionError:  # a body of thousands of nested brackets: nothing a sample looks like
        raise InputError("the body is nested too deeply to be a sample; send {\"text\": \"...\", \"image\": "
                         "\"<base64>\", \"audio\": \"<base64>\"}.") from None


# decoding ------------------------------------------------------------------------------------
def decode_text(data: bytes | str, limits: Limits, where: str) -> str | None:
    """UTF-8 text within ``max_text_chars``; empty or blank text counts as missing (None)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{_part(where, 'text')} is not UTF-8 text (byte {e.start + 1} is not); send UTF-8 "
                             "text.") from e
    if len(data) > limits.max_text_chars:
        raise LimitError(f"{_part(where, 'text')} has {len(data)} characters; the limit is {limits.max_text_chars} "
                         "(max_text_chars, --max-text-chars); send a shorter text.")
    return data if data.strip() else None


def decode_image(data: bytes, limits: Limits, where: str, min_side: int | None = None) -> Any:
    """Image file bytes -> RGB PIL image; the pixel count is checked from the header before decoding.

    ``min_side``: the model's image preprocessor's ``decode_side``; a JPEG is then decoded at the reduced DCT scale
    training decodes it at (``encoders._image_io.load_image``), so both see the same pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise LimitError(f"{_part(where, 'image')} is too large to decode safely; the limit is "
                         f"{limits.max_image_pixels} pixels (max_image_pixels, --max-image-pixels).") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{_part(where, 'image')} is not a readable image ({len(data)} bytes); send a "
                         f"{'/'.join(IMAGE_FORMATS)} file.") from e
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise LimitError(f"{_part(where, 'image')} is {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels} "
                         "pixels (max_image_pixels, --max-image-pixels); send a smaller image.")
    if w == 0 or h == 0:
        raise InputError(f"{_part(where, 'image')} is {w}x{h}; send an image with pixels.")
    try:
        draft(img, min_side).load()
        return to_rgb(img, f"{_part(where, 'image')}")  # as training saw it: upright, alpha composited on white
    except Image.DecompressionBombError as e:
        raise LimitError(f"{_part(where, 'image')} is too large to decode safely; the limit is "
                         f"{limits.max_image_pixels} pixels (max_image_pixels, --max-image-pixels).") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{_part(where, 'image')} is truncated or corrupt ({_plain(e)}); send the whole "
                         "file.") from e


def decode_audio(data: bytes, limits: Limits, where: str) -> tuple[Any, int]:
    """Audio file bytes -> ``(mono float32 waveform [N], rate)``, reading at most ``max_audio_seconds``."""
    import numpy as np
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            if not 1000 <= rate <= 384_000 or not 1 <= channels <= 32:
                raise InputError(f"{_part(where, 'audio')} has {channels} channel(s) at {rate} Hz; send 1-32 "
                                 "channels at 1-384 kHz.")
            cap = int(limits.max_audio_seconds * rate)
            wav = f.read(frames=cap + 1, dtype="float32", always_2d=True)  # [N, channels], N <= cap + 1
    except InputError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError on bad bytes
        raise InputError(f"{_part(where, 'audio')} is not a readable audio file ({len(data)} bytes: {_plain(e)}); "
                         "send a "
                         "WAV/FLAC/OGG file.") from e
    if len(wav) > cap:
        raise LimitError(f"{_part(where, 'audio')} is longer than {limits.max_audio_seconds:g} s, the limit "
                         "(max_audio_seconds, --max-audio-seconds); send a shorter clip.")
    if len(wav) == 0:
        raise InputError(f"{_part(where, 'audio')} has no samples; send a clip with sound.")
    mono = np.ascontiguousarray(wav.mean(axis=1), dtype=np.float32)  # [N]
    if not np.isfinite(mono).all():
        raise InputError(f"{_part(where, 'audio')} holds NaN/inf samples; send a valid clip.")
    return mono, rate


def decode_sample(raw: dict[str, bytes | str], modalities: list[str], limits: Limits,
                  where: str = "body", image_side: int | None = None) -> dict[str, Any]:
    """``{modality: bytes | str}`` -> ``{modality: str | PIL image | (waveform, rate)}`` for ``FusionModel.predict``
    (``image_side``: the image preprocessor's ``decode_side``, see :func:`decode_image`).

    Raises :class:`InputError` (HTTP 422) for unusable inputs and :class:`LimitError` (HTTP 413) for big ones.
    """
    wrong = sorted(m for m in raw if m not in modalities)
    if wrong:
        raise InputError(f"this model takes {', '.join(modalities)}, not {', '.join(wrong)}; drop those inputs "
                         "(GET /model lists the modalities).")
    out: dict[str, Any] = {}
    for m, value in raw.items():
        if m == "text":
            text = decode_text(value, limits, where)
            if text is not None:
                out[m] = text
        elif not value:  # an empty upload (a form's unused file field) = not given
            continue
        elif m == "image":
            out[m] = decode_image(bytes(value), limits, where, image_side)  # type: ignore[arg-type]
        else:
            out[m] = decode_audio(bytes(value), limits, where)  # type: ignore[arg-type]
    if not out:
        who = "the request" if where == "body" else where
        raise InputError(f"{who} has no input; give at least one of {', '.join(modalities)} (text as a "
                         "field, image and audio as files or base64).")
    return out
