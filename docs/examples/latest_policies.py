"""The LatestOnly policy family and the client's order, one small scene each.

Run: python docs/examples/latest_policies.py  (asyncio; any anyio backend works)
"""

import anyio

from cancelkit import LatestOnly, OperationCancelled, SlotBusy


async def attempt(slot: LatestOnly, name: str, done: anyio.Event, seq: int | None = None) -> None:
    """One request: claim the key, work until `done` is set, and say how it ended."""
    try:
        async with slot.claim("alice", seq=seq):
            print(f"  {name}: started")
            await done.wait()
            print(f"  {name}: completed")
    except OperationCancelled as exc:
        stale = exc.reason.message.startswith("stale:")  # refused for its sequence number
        print(f"  {name}: {exc.reason.kind.value}{' (stale)' if stale else ''}")
    except SlotBusy:
        print(f"  {name}: refused (busy)")


async def scene(title: str, slot: LatestOnly, requests: list[tuple[str, int | None]]) -> None:
    """Start the requests one after the other, then let every started one finish."""
    print(title)
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        for name, seq in requests:
            tg.start_soon(attempt, slot, name, done, seq)
            await anyio.wait_all_tasks_blocked()  # it reached its claim (or its end)
        done.set()


async def main() -> None:
    # The client's order: "cancel" (keystroke 6) arrives before "canc" (keystroke 4).
    await scene("order", LatestOnly(), [("cancel#6", 6), ("canc#4", 4)])
    # replace: the newest runs; with max_concurrency=2, the oldest of three is superseded.
    await scene("replace, 2 at once", LatestOnly(max_concurrency=2), [(n, None) for n in "abc"])
    # reject: the running ones finish; newcomers are refused while the key is full.
    await scene("reject", LatestOnly(policy="reject"), [(n, None) for n in "ab"])
    # keep_latest: the running one finishes; only the newest waiter runs after it.
    await scene("keep_latest", LatestOnly(policy="keep_latest"), [(n, None) for n in "abcd"])
    # enqueue: everyone runs in turn, first come first served, up to max_waiting waiting.
    slot = LatestOnly(policy="enqueue", max_waiting=2)
    await scene("enqueue, 2 may wait", slot, [(n, None) for n in "abcd"])


if __name__ == "__main__":
    anyio.run(main)
