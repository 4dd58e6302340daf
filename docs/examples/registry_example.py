"""Cancel running work by id from another "request", and cancel work before it starts."""

from __future__ import annotations

import anyio

from cancelkit import OperationCancelled, TokenRegistry

registry = TokenRegistry()


async def export_report(op_id: str, user: str) -> str:
    """A long job that a user can stop with another request."""
    try:
        async with registry.track(op_id, owner=user):
            await anyio.sleep(3600)  # the expensive part
            return "done"
    except OperationCancelled as exc:
        return f"stopped ({exc.reason.kind}, by {exc.reason.source})"


async def main() -> None:
    results: dict[str, str] = {}

    async def run(op_id: str) -> None:
        results[op_id] = await export_report(op_id, "alice")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "report-1")
        await anyio.wait_all_tasks_blocked()
        print("running for alice:", [op.id for op in registry.operations(owner="alice")])
        # Another user cannot touch it: for bob it does not exist (and nothing is written).
        print("bob cancels report-1:", await registry.cancel("report-1", owner="bob"))
        # DELETE /ops/report-1 from alice:
        print("alice cancels report-1:", await registry.cancel("report-1", owner="alice"))
    print("report-1 ->", results["report-1"])

    # A cancel that arrives before the work registers leaves a tombstone.
    print("alice cancels report-2 early:", await registry.cancel("report-2", owner="alice"))
    await run("report-2")
    print("report-2 ->", results["report-2"])
    # A client that retries the start (a lost answer, say) is refused the same way: the
    # tombstone lasts its whole TTL, so a PENDING answer means it never runs.
    await run("report-2")
    print("report-2 retried ->", results["report-2"])
    print(registry.statistics())


if __name__ == "__main__":
    anyio.run(main)
