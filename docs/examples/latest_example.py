"""A search box: each keystroke supersedes the previous search of the same user."""

from __future__ import annotations

import anyio

from cancelkit import LatestOnly, OperationCancelled

searches = LatestOnly(handover_timeout=1.0)  # bodies for one user never overlap
results: dict[str, str] = {}


async def search(user: str, query: str) -> None:
    try:
        async with searches.claim(user) as claim:
            await anyio.sleep(0.05)  # the expensive query
            if await searches.is_current(user, claim.generation):  # fencing before a write
                results[user] = query
            print(f"{query!r}: finished (generation {claim.generation})")
    except OperationCancelled as exc:
        print(f"{query!r}: {exc.reason.kind} by a newer claim")


async def main() -> None:
    async with anyio.create_task_group() as tg:
        for query in ("c", "ca", "can", "cancel"):
            tg.start_soon(search, "alice", query)
            await anyio.sleep(0.01)  # keystrokes arrive one after another
        tg.start_soon(search, "bob", "trio")  # another key: unaffected
    print("shown:", results)
    print(searches.statistics())


if __name__ == "__main__":
    anyio.run(main)
