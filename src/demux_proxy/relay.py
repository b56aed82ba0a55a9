"""Byte relay between two streams, for upgraded connections (WebSocket and the like)."""

from __future__ import annotations

import asyncio

from demux_proxy.stream import Stream


async def _pump(src: Stream, dst: Stream, moved: list[int], i: int) -> None:
    buf = src.buffer
    while True:
        if buf:
            dst.write(bytes(buf))
            moved[i] += len(buf)
            buf.clear()
            await dst.drain()
        if not await src.fill(have=0):  # bytes that came in during the drain count
            return


async def relay(a: Stream, b: Stream, moved: list[int]) -> None:
    """Copy both ways with backpressure until either side closes or resets; close both.
    `moved` counts the bytes passed on, a to b then b to a (also when this raises)."""
    tasks = [
        asyncio.create_task(_pump(a, b, moved, 0)),
        asyncio.create_task(_pump(b, a, moved, 1)),
    ]
    cut: BaseException | None = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except BaseException as exc:  # cancelled: the proxy is stopping
        cut = exc
    # Not in a `finally`: compiled with mypyc, an await there lost the CancelledError
    # (the cut relay returned as if it had ended cleanly).
    for task in tasks:
        task.cancel()
    # A reset on one side ends the relay like a close does: nothing more to report.
    await asyncio.gather(*tasks, return_exceptions=True)
    a.close()
    b.close()
    if cut is not None:
        raise cut
