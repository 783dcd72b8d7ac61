"""Texts and encoded images -> unit vectors, with per-item errors, off the event loop.

Image decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing);
the model runs behind the cross-request batcher on its own thread. One bad item is reported
for that item only. Recent query texts are answered from a small cache.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import ClipSearchError, InvalidArgument
from ...lru import LruCache
from ...observability import Metrics
from ...priority import background_pool
from ...thumbnails import make_thumbnail
from ..base import Embedded
from .backend import Towers
from .batcher import BULK, INTERACTIVE, Batcher
from .decode_budget import DecodeBudget
from .device_decode import DeviceJpegDecoder, JpegFile
from .preprocess import DRAFT_OVERSAMPLE, ImagePreprocessor

log = logging.getLogger(__name__)

# Calls with at most this many inputs ride the interactive lane unless they are ingest.
INTERACTIVE_MAX_ITEMS = 8
# Model batches of one call decoded ahead of the model: bounds a large request's memory.
WINDOWS_AHEAD = 2
QUERY_DECODE_THREADS = 2  # a query image is decoded apart from bulk work, at normal priority


@dataclass
class _Decoded:
    """One window's decode: the stacked pixels of the rows done, in order, and the rest."""

    pixels: torch.Tensor
    done: list[int]
    failed: dict[int, ClipSearchError]
    thumbnails: dict[int, bytes | None]


def _thumbnail_or_none(data: bytes, size: int, max_pixels: int) -> bytes | None:
    try:
        return make_thumbnail(data, size, max_pixels)
    except InvalidArgument:
        return None  # the model's path reports the error


class Embedder:
    """Runs preprocessing and, through the batcher, the model for the service."""

    def __init__(self, model: Towers, max_batch_size: int, max_image_pixels: int,
                 decode_threads: int, max_queued_batches: int = 64,
                 metrics: Metrics | None = None, max_text_chars: int = 10_000,
                 batch_wait_s: float = 0.002, text_cache_size: int = 4096,
                 jpeg_draft: bool = True,
                 device_decoder: DeviceJpegDecoder | None = None,
                 max_decoded_bytes: int = 1 << 30) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_text_chars = max_text_chars
        draft = model.image_size * DRAFT_OVERSAMPLE if jpeg_draft else None
        self.preprocess = ImagePreprocessor(model.transform, max_image_pixels, draft)
        self.device_decoder = device_decoder  # JPEGs decoded on the GPU when set
        # Text -> embedding: repeated queries skip the model.
        self.cache: LruCache[str, np.ndarray] = LruCache(text_cache_size)
        # A decoded image is a 3 x S x S float32 tensor, and stacking a window copies it once.
        self.decoded_image_bytes = 2 * 3 * model.image_size * model.image_size * 4
        self.decode_budget = DecodeBudget(max_decoded_bytes)
        self.batcher = Batcher({"text": model.encode_texts, "image": model.encode_images},
                               max_batch_size, batch_wait_s, max_queued_batches, metrics,
                               pausable=frozenset({"image"} if model.pausable else ()))
        # Bulk images decode at a lower priority than the model and the queries (priority.py);
        # a query's image decodes at normal priority in a pool of its own.
        self._decode_pool = background_pool(decode_threads, "clipsearch-decode")
        self._query_decode_pool = ThreadPoolExecutor(QUERY_DECODE_THREADS,
                                                     thread_name_prefix="clipsearch-query-decode")

    @property
    def dim(self) -> int:
        return self.model.dim

    def close(self) -> None:
        for pool in (self._decode_pool, self._query_decode_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        self.batcher.close()

    async def embed_texts(self, texts: list[str], deadline: float | None = None,
                          bulk: bool = False) -> Embedded:
        """Embed texts; `deadline` is a time.monotonic() after which the work is dropped."""
        errors: dict[int, ClipSearchError] = {}
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        for i, text in enumerate(texts):
            if not text.strip():
                errors[i] = InvalidArgument("text is empty")
            elif len(text) > self.max_text_chars:
                errors[i] = InvalidArgument(
                    f"text is {len(text)} characters, over the limit of {self.max_text_chars}")
            elif (cached := self.cache.get(text)) is not None:
                vectors[i] = cached
            else:
                todo.append(i)
        lane = self._lane(len(texts), bulk)
        chunks = [todo[s:s + self.max_batch_size]
                  for s in range(0, len(todo), self.max_batch_size)]
        results = await asyncio.gather(*(
            self.batcher.submit("text", [texts[i] for i in rows], lane, deadline)
            for rows in chunks))
        for rows, result in zip(chunks, results, strict=True):
            vectors[rows] = result
            for i, vector in zip(rows, result, strict=True):
                self.cache.put(texts[i], vector)
        return Embedded(vectors, errors)

    async def embed_images(self, images: list[bytes], deadline: float | None = None,
                           bulk: bool = False, thumbnail_size: int = 0) -> Embedded:
        """Decode and embed images; undecodable ones are reported per item.

        Work goes in windows of one model batch, at most two of them decoded ahead per call,
        so a large request never holds all its decoded pixels at once. With `thumbnail_size`,
        each image's thumbnail is made from the picture decoded for the model.
        """
        errors: dict[int, ClipSearchError] = {}
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        thumbnails: list[bytes | None] | None = (
            [None] * len(images) if thumbnail_size else None)
        lane = self._lane(len(images), bulk)
        ahead = asyncio.Semaphore(WINDOWS_AHEAD)

        async def window(rows: list[int]) -> None:
            async with ahead, self.decode_budget.hold(len(rows) * self.decoded_image_bytes,
                                                      deadline):
                decode = self._decode_on_device if self.device_decoder else self._decode_on_host
                pool = self._decode_pool if lane == BULK else self._query_decode_pool
                decoded = await decode([images[i] for i in rows], pool, thumbnail_size)
                errors.update({rows[j]: exc for j, exc in decoded.failed.items()})
                if thumbnails is not None:
                    for j, thumbnail in decoded.thumbnails.items():
                        thumbnails[rows[j]] = thumbnail
                if decoded.done:
                    result = await self.batcher.submit("image", decoded.pixels, lane, deadline)
                    vectors[[rows[j] for j in decoded.done]] = result

        await asyncio.gather(*(window(list(range(s, min(len(images), s + self.max_batch_size))))
                               for s in range(0, len(images), self.max_batch_size)))
        return Embedded(vectors, errors, thumbnails)

    async def _decode_on_host(self, datas: list[bytes], pool: ThreadPoolExecutor,
                              thumbnail_size: int = 0) -> _Decoded:
        """Pillow and open_clip's transform (and the thumbnails) in `pool`."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(pool, self._preprocess_one, data, thumbnail_size)
              for data in datas))
        failed = {i: d for i, d in enumerate(decoded) if isinstance(d, ClipSearchError)}
        done = [i for i in range(len(datas)) if i not in failed]
        pixels = torch.stack([decoded[i][0] for i in done]) if done else torch.empty(0)
        return _Decoded(pixels, done, failed, {i: decoded[i][1] for i in done})

    async def _decode_on_device(self, datas: list[bytes], pool: ThreadPoolExecutor,
                                thumbnail_size: int = 0) -> _Decoded:
        """JPEGs decoded as one batch on the model's device; the rest on the host, then moved.

        The device's pictures never reach the host, so their thumbnails come from a reduced
        scale decode on the host (thumbnails.make_thumbnail), beside the device's work.
        """
        decoder = self.device_decoder
        assert decoder is not None
        loop = asyncio.get_running_loop()
        headers = await loop.run_in_executor(pool, self._inspect_all, datas)
        failed = {i: h for i, h in enumerate(headers) if isinstance(h, ClipSearchError)}
        jpegs = [i for i, h in enumerate(headers) if isinstance(h, JpegFile)]
        parts: list[torch.Tensor] = []
        done: list[int] = []
        thumbnails: dict[int, bytes | None] = {}
        if jpegs:
            small = (asyncio.gather(*(loop.run_in_executor(
                pool, _thumbnail_or_none, datas[i], thumbnail_size, decoder.max_pixels)
                for i in jpegs)) if thumbnail_size else None)
            pixels, refused = await loop.run_in_executor(
                pool, decoder.decode, [headers[i] for i in jpegs])
            refused_rows = {jpegs[j] for j in refused}
            done = [i for i in jpegs if i not in refused_rows]
            if small is not None:
                thumbnails.update(zip(jpegs, await small, strict=True))
            if done:
                parts.append(pixels)
        host = sorted(set(range(len(datas))) - set(failed) - set(done))
        if host:
            on_host = await self._decode_on_host([datas[i] for i in host], pool, thumbnail_size)
            failed.update({host[j]: exc for j, exc in on_host.failed.items()})
            thumbnails.update({host[j]: t for j, t in on_host.thumbnails.items()})
            if on_host.done:
                pixels = on_host.pixels
                if decoder.device.type == "cuda":
                    pixels = pixels.pin_memory()  # so the copy below runs asynchronously
                parts.append(pixels.to(decoder.device, non_blocking=True))
                done += [host[j] for j in on_host.done]
        # Rows in the order of `done`, which is the order of the pixels.
        return _Decoded(torch.cat(parts) if parts else torch.empty(0), done, failed,
                        {i: thumbnails.get(i) for i in done})

    def _inspect_all(self, datas: list[bytes]) -> list[JpegFile | ClipSearchError | None]:
        assert self.device_decoder is not None
        out: list[JpegFile | ClipSearchError | None] = []
        for data in datas:
            try:
                out.append(self.device_decoder.inspect(data))
            except ClipSearchError as exc:
                out.append(exc)
            except Exception:  # a header Pillow cannot parse: the host path reports it
                out.append(None)
        return out

    @staticmethod
    def _lane(n: int, bulk: bool) -> str:
        return BULK if bulk or n > INTERACTIVE_MAX_ITEMS else INTERACTIVE

    def _preprocess_one(self, data: bytes, thumbnail_size: int = 0
                        ) -> tuple[torch.Tensor, bytes | None] | ClipSearchError:
        try:
            if thumbnail_size:
                return self.preprocess.with_thumbnail(data, thumbnail_size)
            return self.preprocess(data), None
        except ClipSearchError as exc:
            return exc
        except Exception as exc:  # a decoder bug must not fail the neighbours
            log.warning("image preprocessing failed: %r", exc)
            return InvalidArgument(f"image could not be processed: {exc}")
