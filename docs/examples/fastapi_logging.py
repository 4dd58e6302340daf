"""Show cancelkit's log lines (the 499 of a client that left) under `uvicorn app:app`.

Run: uvicorn --app-dir docs/examples fastapi_logging:app, open /report and close the tab.
"""

import asyncio
import logging

from fastapi import FastAPI

from cancelkit import CancelOnDisconnect
from cancelkit.fastapi import install

# [logging]
cancelkit_log = logging.getLogger("cancelkit")
cancelkit_log.setLevel(logging.INFO)
handler = logging.StreamHandler()  # stderr, like uvicorn's own lines
handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s %(message)s"))
cancelkit_log.addHandler(handler)
# [/logging]

api = FastAPI()
install(api)


@api.get("/report")
async def report() -> dict[str, str]:
    await asyncio.sleep(30)  # interrupted when the client leaves; 499 is logged
    return {"status": "done"}


app = CancelOnDisconnect(api)
