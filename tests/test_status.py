"""The status model of background operations: states and the JSON form."""

from cancelkit import (
    CancelKind,
    CancelReason,
    OperationError,
    OperationState,
    OperationStatus,
    Progress,
)


def test_a_status_round_trips_through_json() -> None:
    """to_json()/from_json() keep every field (the Redis store and HTTP bodies use them)."""
    reason = CancelReason(
        CancelKind.PARENT, source="w1", origin=CancelReason(CancelKind.SHUTDOWN, at=5.0), at=6.0
    )
    status = OperationStatus(
        "id",
        "alice",
        OperationState.CANCELLED,
        1.0,
        2.0,
        result=[1, "a"],
        error=OperationError("E", "m"),
        reason=reason,
        progress=Progress(1, 2, "half"),
        worker="w1",
    )
    assert OperationStatus.from_json(status.to_json()) == status


def test_every_state_but_running_has_ended() -> None:
    """OperationState.ended is False only for RUNNING."""
    assert [state for state in OperationState if not state.ended] == [OperationState.RUNNING]
