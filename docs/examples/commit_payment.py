"""Commit points: a payment that Stop can cancel until the card is charged, and only then.

Run: python docs/examples/commit_payment.py
"""

from __future__ import annotations

import anyio

from cancelkit import OperationCancelled, TokenRegistry

registry = TokenRegistry()
charged: list[str] = []
provider_answered = anyio.Event()  # (stands in for the payment provider's network round trip)


async def charge_card(order: str) -> None:
    """The payment provider's API call: once sent, it cannot be taken back."""
    await provider_answered.wait()
    charged.append(order)


async def pay(order: str, *, quote_ready: anyio.Event) -> str:
    try:
        async with registry.track(order) as op:
            await quote_ready.wait()  # compute the quote: free to stop
            await op.commit()  # the commit point: from here on, Stop answers "committed"
            await charge_card(order)  # never cut half way by cancelkit
            return "paid"
    except OperationCancelled as exc:
        return f"stopped before the charge ({exc.reason.kind})"


async def main() -> None:
    results: dict[str, str] = {}
    slow_quote, quick_quote = anyio.Event(), anyio.Event()

    async def run(order: str, quote_ready: anyio.Event) -> None:
        results[order] = await pay(order, quote_ready=quote_ready)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "order-1", slow_quote)  # Stop arrives while it quotes...
        tg.start_soon(run, "order-2", quick_quote)
        quick_quote.set()  # ... and while order-2's card is being charged
        await anyio.wait_all_tasks_blocked()
        print("Stop order-1 ->", await registry.cancel("order-1"))
        print("Stop order-2 ->", await registry.cancel("order-2"))
        provider_answered.set()
    for order, result in sorted(results.items()):
        print(order, "->", result)
    print("charged:", charged)


if __name__ == "__main__":
    anyio.run(main)
