"""The module side of honest end reasons and of one protocol line per event (issue 10,
findings 5 and 7): which ``EndReason`` each way of ending stands for, the ``bye`` that carries it
to the peer, and the ``event_id`` both parties put on their reports of one consent event."""

from __future__ import annotations

import unicodedata

from hypothesis import given, strategies as st

from modules.common.session.channel_events import Failed, FailureKind
from modules.common.session.consent import ConsentState, Role, SessionEnded, encode_message
from modules.common.session.session_runner import (
    EventIds, bye_text, reason_of_channel_failure, reason_of_consent_end,
)
from protocol.session_end import PARTIES, EndCause, EndReason

TERMS = "We help you with your printer. Everything is logged."


def test_consent_ends_name_who_and_why():
    assert reason_of_consent_end(SessionEnded(Role.CUSTOMER, "emergency stop")) == EndReason(
        EndCause.EMERGENCY_STOP, "customer")
    assert reason_of_consent_end(SessionEnded(Role.CUSTOMER, "terms declined")).cause \
        is EndCause.DECLINED
    assert reason_of_consent_end(SessionEnded(Role.HOST, "bad control message: x")) == EndReason(
        EndCause.ERROR, "host", "bad control message: x")
    # an older peer's free text is still "ended by" that peer, with its words as detail
    assert reason_of_consent_end(SessionEnded(Role.SUPPORTER, "stdin closed")) == EndReason(
        EndCause.ENDED, "supporter", "stdin closed")
    assert EndReason(EndCause.EMERGENCY_STOP, "host").text() == "emergency stop by the host"
    assert EndReason(EndCause.SERVER_LOST, "server").text() == "lost the connection to the server"
    assert EndReason(EndCause.SERVER_LOST, "server").abnormal
    assert not EndReason(EndCause.ENDED, "supporter").abnormal


@given(cause=st.sampled_from(list(EndCause)), by=st.sampled_from(PARTIES),
       detail=st.text(max_size=80))
def test_the_bye_carries_the_reason_to_the_peer(cause, by, detail):
    """What one side decides, the other side reads out of the ``bye`` (its detail in one line,
    without control characters)."""
    reason = EndReason(cause, by, " ".join(
        "".join(c for c in detail if unicodedata.category(c) != "Cc").split()))
    state = ConsentState("supporter", peer="host")
    peer = ConsentState("host")
    outcome = state.end(bye_text(reason))
    got = peer.receive(encode_message(outcome.messages[0]))
    ended = [e for e in got.events if isinstance(e, SessionEnded)][0]
    assert reason_of_consent_end(ended) == EndReason.from_fields(reason.fields())


def test_channel_failures_before_the_keys():
    key = Failed("key confirmation failed", FailureKind.KEY_CONFIRMATION)
    assert reason_of_channel_failure(key, "customer", "supporter").cause is EndCause.KEY_FAILED
    refused = Failed("supporter bob is not on this host's allow-list", FailureKind.ABORTED)
    assert reason_of_channel_failure(refused, "supporter", "host") == EndReason(
        EndCause.DECLINED, "host", "supporter bob is not on this host's allow-list")
    cut = Failed("the stream ended", FailureKind.TRUNCATED)
    assert reason_of_channel_failure(cut, "supporter", "customer").cause \
        is EndCause.CONNECTION_LOST


class Side:
    """One party: its consent state and the reports it would send (stamped as the runner does)."""

    def __init__(self, state: ConsentState) -> None:
        self.state = state
        self.ids = EventIds()
        self.reports: list[tuple[str, dict]] = []
        self.outbox: list[bytes] = []

    def apply(self, outcome) -> None:
        self.outbox += [encode_message(m) for m in outcome.messages]
        for event in outcome.events:
            line = event.protocol_event()
            if line["kind"] != "ended":
                self.reports.append((line["kind"], self.ids.stamp(line["kind"], line["detail"])))


def pump(a: Side, b: Side) -> None:
    while a.outbox or b.outbox:
        for src, dst in ((a, b), (b, a)):
            out, src.outbox = src.outbox, []
            for data in out:
                dst.apply(dst.state.receive(data))


def test_both_reports_of_one_consent_event_carry_the_same_event_id():
    supporter = Side(ConsentState("supporter", peer="customer", terms=TERMS))
    customer = Side(ConsentState("customer", terms=TERMS))
    supporter.apply(supporter.state.start())
    customer.apply(customer.state.start())
    pump(supporter, customer)
    customer.apply(customer.state.accept_terms(True))
    pump(supporter, customer)
    for right in ("view", "control"):
        supporter.apply(supporter.state.request(right))
        pump(supporter, customer)
        customer.apply(customer.state.answer(right, True))
        pump(supporter, customer)
    supporter.apply(supporter.state.chat("Hello"))
    supporter.apply(supporter.state.chat("Hello"))   # the same words twice: two events
    supporter.apply(supporter.state.comment("printer issue"))
    pump(supporter, customer)
    customer.apply(customer.state.emergency_stop())
    pump(supporter, customer)

    def by_id(side: Side) -> dict[str, tuple[str, dict]]:
        return {d["event_id"]: (k, d) for k, d in side.reports}
    s_ids, c_ids = by_id(supporter), by_id(customer)
    assert len(s_ids) == len(supporter.reports) and len(c_ids) == len(customer.reports)
    shared = set(s_ids) & set(c_ids)
    shared_kinds = sorted(s_ids[i][0] for i in shared)
    assert shared_kinds == sorted(
        ["terms_accepted", "right_requested", "right_requested", "right_granted",
         "right_granted", "chat", "chat", "right_revoked", "right_revoked", "emergency_stop"])
    for event_id in shared:   # one event, the same detail on both sides
        assert s_ids[event_id] == c_ids[event_id]
    # what only one side sees stays one report: the comment, each side's view of the terms
    only_supporter = sorted(s_ids[i][0] for i in set(s_ids) - shared)
    only_customer = sorted(c_ids[i][0] for i in set(c_ids) - shared)
    assert only_supporter == ["comment", "terms_shown"] and only_customer == ["terms_shown"]


def test_file_events_are_named_by_the_transfer_not_the_wording():
    ids_a, ids_b = EventIds(), EventIds()
    common = {"id": "t1", "name": "a.txt", "size": 3, "sha256": "ab" * 32,
              "direction": "supporter_to_peer"}
    a = ids_a.stamp("file_completed", {**common, "saved_as": "a.txt"})
    b = ids_b.stamp("file_completed", {**common, "saved_as": "a (1).txt"})
    assert a["event_id"] == b["event_id"]
    assert ids_a.stamp("file_offered", common)["event_id"] != a["event_id"]
