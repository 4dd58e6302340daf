"""scope() raises when the token stops the block; move_on() just ends it.

Run: python docs/examples/token_scopes.py
"""

import anyio

from cancelkit import CancellationToken, OperationCancelled


async def do_work(token: CancellationToken) -> None:
    token.cancel()  # stands for a cancel arriving from elsewhere while the work runs
    await anyio.sleep(1)


async def main() -> None:
    token = CancellationToken()
    try:
        with token.scope():  # raises OperationCancelled when the token stops the block
            await do_work(token)
    except OperationCancelled as exc:
        print("scope():", exc.reason.kind)

    token = CancellationToken()
    with token.move_on() as scope:  # just ends the block
        await do_work(token)
    print("move_on(): cancelled_caught =", scope.cancelled_caught)


if __name__ == "__main__":
    anyio.run(main)
