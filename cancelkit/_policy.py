"""Policy: what a latest-only claim does when its key is full, as a value backends branch on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, final

__all__ = ["Policy", "PolicyName", "check_known", "preset_name"]

#: The names of the preset policies, accepted wherever a :class:`Policy` is.
PolicyName = Literal["replace", "reject", "enqueue", "keep_latest"]

_WHEN_BUSY = ("supersede", "wait", "refuse")
_WHEN_FULL = ("supersede", "refuse")


@final
@dataclass(frozen=True, slots=True)
class Policy:
    """What a newcomer does when ``max_concurrency`` claims of its key are running.

    The decision is the backend's, atomic with the admission; every backend branches on these
    parts (and refuses a value it does not know) instead of on names. The named policies of
    :class:`~cancelkit.LatestOnly` are presets (:meth:`named`):

    ===============  ========================================================
    ``replace``      ``Policy("supersede")``
    ``reject``       ``Policy("refuse")``
    ``enqueue``      ``Policy("wait")``: first come first served, at most 1,000 waiting
    ``keep_latest``  ``Policy("wait", "supersede", max_waiting=1)``: only the newest waits
    ===============  ========================================================

    Attributes:
        when_busy: ``"supersede"``: the oldest running claim is superseded and the newcomer
            runs; ``"wait"``: the newcomer waits for a free slot, in arrival order;
            ``"refuse"``: the newcomer is refused (:exc:`~cancelkit.SlotBusy`).
        when_full: with ``"wait"``, when ``max_waiting`` claims wait already:
            ``"supersede"``: the oldest waiting claim is superseded (before its body ever
            started) and the newcomer waits; ``"refuse"``: the newcomer is refused.
        max_waiting: with ``"wait"``, the most claims waiting per key.

    Raises:
        ValueError: for a part that is not one of the values above, or ``max_waiting`` not
            an int >= 1.

    .. versionadded:: 0.1
    """

    when_busy: Literal["supersede", "wait", "refuse"]
    when_full: Literal["supersede", "refuse"] = "refuse"
    max_waiting: int = 1_000

    def __post_init__(self) -> None:
        if self.when_busy not in _WHEN_BUSY:
            raise ValueError(f"when_busy must be one of {_WHEN_BUSY}, not {self.when_busy!r}")
        if self.when_full not in _WHEN_FULL:
            raise ValueError(f"when_full must be one of {_WHEN_FULL}, not {self.when_full!r}")
        if type(self.max_waiting) is not int or self.max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, not {self.max_waiting!r}")

    @staticmethod
    def named(name: str) -> Policy:
        """Return the preset called ``name`` (see the table above).

        Raises:
            ValueError: if there is no preset of that name.
        """
        try:
            return _PRESETS[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown policy {name!r}; expected a Policy or one of {', '.join(_PRESETS)}"
            ) from None


#: The presets: adding a named policy is one line here (and one in ``PolicyName``).
_PRESETS: dict[str, Policy] = {
    "replace": Policy("supersede"),
    "reject": Policy("refuse"),
    "enqueue": Policy("wait"),
    "keep_latest": Policy("wait", "supersede", max_waiting=1),
}


def preset_name(policy: Policy) -> str | None:
    """The name of the preset equal to ``policy``, if there is one."""
    return next((name for name, preset in _PRESETS.items() if preset == policy), None)


def check_known(policy: Policy) -> None:
    """Raise ``ValueError`` for a policy with a part this version does not know."""
    if (
        policy.when_busy not in _WHEN_BUSY
        or policy.when_full not in _WHEN_FULL
        or type(policy.max_waiting) is not int
    ):
        raise ValueError(f"a policy this backend does not know: {policy!r}")
