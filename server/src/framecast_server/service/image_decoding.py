"""Images of a request as numpy, with compressed ones decoded off the event loop.

Raw images are views of the received bytes and cost nothing: they are read on the loop.
JPEG and PNG images cost a decode each (a few hundred microseconds for 224x224), which on
the event loop would stall every other call; they are decoded on a small thread pool
(Pillow releases the GIL while it decodes), the same way the server runs model preparation
and the backend off the loop. The reading itself is :mod:`.codecs.requests`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from numpy.typing import NDArray

from .codecs import requests

__all__ = ["ImageDecoder"]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    """One decoding pool per process (up to 4 threads, at most the CPUs), made on first use.

    Shared by every server in the process, so servers started and stopped (tests, demo) leave
    no threads behind them; idle threads cost nothing.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="framecast-decode"
            )
        return _POOL


class ImageDecoder:
    """Reads request images; decodes compressed ones on the process's decoding threads."""

    def __init__(self) -> None:
        self._pool = _shared_pool()

    async def batch(
        self, images: Sequence[pb.Image], *, height: int, width: int, max_batch: int
    ) -> NDArray[np.uint8]:
        """The images of a Classify request as one uint8 [N, H, W, 3] batch (validated)."""
        if not any(requests.is_encoded(image) for image in images):
            return requests.images_from_proto(
                images, height=height, width=width, max_batch=max_batch
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _images, images, height, width, max_batch)

    async def image(self, image: pb.Image, *, height: int, width: int) -> NDArray[np.uint8]:
        """One compressed stream frame, decoded on a thread, as uint8 [H, W, 3]."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _image, image, height, width)


def _images(
    images: Sequence[pb.Image], height: int, width: int, max_batch: int
) -> NDArray[np.uint8]:
    return requests.images_from_proto(images, height=height, width=width, max_batch=max_batch)


def _image(image: pb.Image, height: int, width: int) -> NDArray[np.uint8]:
    return requests.image_from_proto(image, height=height, width=width)
