"""Consent: terms first, rights granted/denied/revoked one by one and enforced by the presenter,
emergency stop from either side, direction change with the would-be presenter's consent,
timeouts meaning "no", host policies, hostile control messages; the Twisted driver with a clock,
and the terminal questions scripted through a pipe."""

from __future__ import annotations

import io
import json
import os

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from zope.interface import implementer

from modules.common.session.consent import (
    MAX_MESSAGE_BYTES,
    SCHEMA,
    Chat,
    Comment,
    ConsentDriver,
    ConsentError,
    ConsentState,
    ConsentUsageError,
    DirectionChanged,
    DirectionDenied,
    DirectionRequested,
    EmergencyStopped,
    IConsentUI,
    Outcome,
    Question,
    Right,
    RightDenied,
    RightGranted,
    RightRefused,
    RightRequested,
    RightRevoked,
    Role,
    SessionEnded,
    TermsAccepted,
    TermsShown,
    decode_message,
    encode_message,
    question_for,
    terms_sha256,
    validate_message,
)
from modules.common.terminal.consent_terminal import TerminalConsentUI

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TERMS = "Support terms of Example GmbH.\nWe record this session.\tÄÖÜ ✓"


class Side:
    """One party: its state and everything it saw (events) and sent (encoded messages)."""

    def __init__(self, state: ConsentState) -> None:
        self.state = state
        self.events: list = []
        self.outbox: list[bytes] = []

    def take(self, outcome: Outcome) -> Outcome:
        self.events += outcome.events
        self.outbox += [encode_message(m) for m in outcome.messages]
        return outcome

    def kinds(self) -> list[str]:
        return [e.protocol_event()["kind"] for e in self.events]


class Pair:
    """Two sides joined by an in-order wire carrying the real encoded messages."""

    def __init__(self, supporter: ConsentState, peer: ConsentState) -> None:
        self.supporter, self.peer = Side(supporter), Side(peer)
        self.now = 0.0

    def other(self, side: Side) -> Side:
        return self.peer if side is self.supporter else self.supporter

    def deliver(self, sender: Side, count: int | None = None) -> None:
        """Deliver ``count`` (default: all) of ``sender``'s queued messages, in order."""
        receiver = self.other(sender)
        n = len(sender.outbox) if count is None else count
        batch, sender.outbox = sender.outbox[:n], sender.outbox[n:]
        for data in batch:
            receiver.take(receiver.state.receive(data, self.now))

    def flush(self) -> None:
        while self.supporter.outbox or self.peer.outbox:
            self.deliver(self.supporter)
            self.deliver(self.peer)


def adhoc(accept: bool = True, **customer_options) -> Pair:
    pair = Pair(ConsentState(Role.SUPPORTER, peer=Role.CUSTOMER, terms=TERMS),
                ConsentState(Role.CUSTOMER, **customer_options))
    pair.supporter.take(pair.supporter.state.start())
    pair.peer.take(pair.peer.state.start())
    pair.flush()
    if accept:
        pair.peer.take(pair.peer.state.accept_terms(True))
        pair.flush()
    return pair


def host(policy=None) -> Pair:
    return Pair(ConsentState(Role.SUPPORTER, peer=Role.HOST),
                ConsentState(Role.HOST, policy=policy))


def ask_and_answer(pair: Pair, right: Right, yes: bool) -> None:
    pair.supporter.take(pair.supporter.state.request(right))
    pair.flush()
    question = pair.peer.events[-1]
    assert question == RightRequested(right, Role.SUPPORTER, ask=True,
                                      deadline=pair.now + pair.peer.state.answer_timeout)
    pair.peer.take(pair.peer.state.answer(question, yes))
    pair.flush()


# --- terms --------------------------------------------------------------------------------------

def test_terms_come_first_and_are_accepted_with_the_hash_of_the_exact_text():
    pair = adhoc(accept=False)
    shown = [e for e in pair.peer.events if isinstance(e, TermsShown)]
    assert shown == [TermsShown(TERMS, terms_sha256(TERMS), Role.CUSTOMER, ask=True, deadline=600.0)]
    assert not pair.supporter.state.terms_accepted
    # nothing but the terms before they are accepted: the supporter's side refuses to ask ...
    with pytest.raises(ConsentUsageError):
        pair.supporter.state.request(Right.VIEW)
    with pytest.raises(ConsentUsageError):
        pair.supporter.state.chat("hello")
    # ... and a request that arrives anyway (a modified supporter module) is refused and logged
    refused = pair.peer.state.receive(
        encode_message({"type": "request", "right": "control", "epoch": 0}))
    assert refused.events == [RightRequested(Right.CONTROL, Role.SUPPORTER),
                              RightDenied(Right.CONTROL, Role.CUSTOMER, "terms not accepted")]
    assert [e.protocol_event()["kind"] for e in refused.events] == ["right_requested",
                                                                    "right_denied"]
    assert refused.messages == [
        {"type": "deny", "right": "control", "reason": "terms not accepted", "epoch": 0}]
    assert not pair.peer.state.allows(Right.CONTROL)
    # other messages before the terms are a protocol error
    with pytest.raises(ConsentError, match="before the support terms"):
        pair.peer.state.handle({"type": "chat", "text": "hi"})

    pair.peer.take(pair.peer.state.accept_terms(True))
    assert pair.peer.outbox[-1] == encode_message(
        {"type": "terms_accepted", "sha256": terms_sha256(TERMS)})
    pair.flush()
    assert pair.supporter.state.terms_accepted
    assert pair.supporter.state.accepted_sha256 == terms_sha256(TERMS)
    assert pair.supporter.kinds() == ["terms_shown", "terms_accepted"]
    assert pair.supporter.events[-1] == TermsAccepted(terms_sha256(TERMS), Role.CUSTOMER)
    assert pair.supporter.events[-1].protocol_event() == {
        "kind": "terms_accepted", "detail": {"sha256": terms_sha256(TERMS), "by": "customer"}}


def test_terms_from_the_server_must_match_what_the_supporter_sends():
    customer = ConsentState(Role.CUSTOMER, terms=TERMS)
    shown = customer.start(now=5.0).events
    assert shown == [TermsShown(TERMS, terms_sha256(TERMS), Role.CUSTOMER, ask=True, deadline=605.0)]
    assert customer.handle({"type": "terms", "text": TERMS}) == Outcome([], [])
    with pytest.raises(ConsentError, match="differ"):
        customer.handle({"type": "terms", "text": TERMS + " (changed)"})
    # a supporter that knows the text refuses an acceptance of another text
    supporter = ConsentState(Role.SUPPORTER, peer=Role.CUSTOMER, terms=TERMS)
    with pytest.raises(ConsentError, match="other terms"):
        supporter.handle({"type": "terms_accepted", "sha256": terms_sha256("other")})
    # a supporter that does not know them records whatever hash the customer accepted
    blind = ConsentState(Role.SUPPORTER, peer=Role.CUSTOMER)
    assert blind.start() == Outcome([], [])
    blind.handle({"type": "terms_accepted", "sha256": terms_sha256(TERMS)})
    assert blind.accepted_sha256 == terms_sha256(TERMS)
    with pytest.raises(ConsentError, match="twice"):
        blind.handle({"type": "terms_accepted", "sha256": terms_sha256(TERMS)})


def test_declined_or_unanswered_terms_end_the_session():
    pair = adhoc(accept=False)
    pair.peer.take(pair.peer.state.accept_terms(False))
    pair.flush()
    assert pair.supporter.state.ended and pair.peer.state.ended
    assert pair.supporter.events[-1] == SessionEnded(Role.CUSTOMER, "terms declined")

    pair = adhoc(accept=False)
    assert pair.peer.state.next_deadline() == 600.0
    assert pair.peer.take(pair.peer.state.expire(599.0)) == Outcome([], [])
    pair.peer.take(pair.peer.state.expire(600.0))
    pair.flush()
    assert pair.supporter.events[-1] == SessionEnded(Role.CUSTOMER, "terms not accepted in time")
    assert pair.peer.state.accept_terms(True) == Outcome([], [])  # too late


def test_terms_belong_to_ad_hoc_sessions_only():
    with pytest.raises(ValueError):
        ConsentState(Role.HOST, terms=TERMS)
    with pytest.raises(ConsentError, match="only a customer"):
        ConsentState(Role.HOST).handle({"type": "terms", "text": TERMS})
    with pytest.raises(ConsentError, match="only a customer accepts"):
        ConsentState(Role.SUPPORTER, peer=Role.HOST).handle(
            {"type": "terms_accepted", "sha256": "0" * 64})
    with pytest.raises(ConsentUsageError):
        ConsentState(Role.CUSTOMER).accept_terms(True)  # nothing shown yet


# --- rights -------------------------------------------------------------------------------------

def test_each_right_is_granted_denied_and_revoked_on_its_own():
    pair = adhoc()
    customer, supporter = pair.peer.state, pair.supporter.state
    ask_and_answer(pair, Right.VIEW, True)
    ask_and_answer(pair, Right.CONTROL, False)
    ask_and_answer(pair, Right.FILES, True)
    assert [customer.allows(r) for r in Right] == [True, False, True]
    assert [supporter.holds(r) for r in Right] == [True, False, True]
    assert not supporter.allows(Right.VIEW)  # the viewer enforces nothing
    answers = [e for e in pair.supporter.events if isinstance(e, (RightGranted, RightDenied))]
    assert answers == [RightGranted(Right.VIEW, Role.CUSTOMER),
                       RightDenied(Right.CONTROL, Role.CUSTOMER, "declined"),
                       RightGranted(Right.FILES, Role.CUSTOMER)]
    pair.peer.take(customer.revoke(Right.FILES))
    pair.flush()
    assert [customer.allows(r) for r in Right] == [True, False, False]
    assert [supporter.holds(r) for r in Right] == [True, False, False]
    assert pair.supporter.events[-1] == RightRevoked(Right.FILES, Role.CUSTOMER)
    assert customer.revoke(Right.CONTROL) == Outcome([], [])  # never granted: nothing to do
    ask_and_answer(pair, Right.CONTROL, True)  # asked again after a "no"
    assert customer.allows(Right.CONTROL) and customer.allows(Right.VIEW)
    assert pair.supporter.kinds() == [
        "terms_shown", "terms_accepted",
        "right_requested", "right_granted", "right_requested", "right_denied",
        "right_requested", "right_granted", "right_revoked", "right_requested", "right_granted"]
    with pytest.raises(ConsentUsageError):
        supporter.revoke(Right.VIEW)  # only the presenter revokes
    with pytest.raises(ConsentUsageError):
        customer.request(Right.VIEW)  # the presenter needs no rights


@FAST
@given(st.lists(st.tuples(st.sampled_from(list(Right)), st.sampled_from(["yes", "no", "revoke"])),
                max_size=25))
def test_rights_follow_the_presenters_decisions_independently(actions):
    pair = adhoc()
    model: set[Right] = set()
    for right, action in actions:
        if action == "revoke":
            pair.peer.take(pair.peer.state.revoke(right))
            pair.flush()
            model.discard(right)
        elif right not in model:
            ask_and_answer(pair, right, action == "yes")
            if action == "yes":
                model.add(right)
        assert {r for r in Right if pair.peer.state.allows(r)} == model
        assert {r for r in Right if pair.supporter.state.holds(r)} == model


def test_a_right_never_granted_is_refused_and_logged():
    pair = adhoc()
    customer = pair.peer.state
    refusals = [customer.enforce(Right.CONTROL, "pointer event").events for _ in range(9)]
    assert refusals[0] == [RightRefused(Right.CONTROL, "pointer event", 1)]
    assert refusals[0][0].protocol_event() == {
        "kind": "right_refused", "detail": {"right": "control", "attempt": "pointer event", "count": 1}}
    # repeated attempts are counted, and logged at 1, 2, 4, 8 ...
    assert [r[0].count for r in refusals if r] == [1, 2, 4, 8]
    ask_and_answer(pair, Right.CONTROL, True)
    assert customer.enforce(Right.CONTROL, "pointer event") == Outcome([], [])
    pair.peer.take(customer.revoke(Right.CONTROL))
    assert customer.enforce(Right.CONTROL, "key event").events == [
        RightRefused(Right.CONTROL, "key event", 1)]
    assert customer.enforce(Right.FILES, "file chunk").events == [
        RightRefused(Right.FILES, "file chunk", 1)]


def test_unsolicited_or_misdirected_rights_messages_are_errors():
    pair = adhoc()
    customer, supporter = pair.peer.state, pair.supporter.state
    with pytest.raises(ConsentError, match="not requested"):
        supporter.handle({"type": "grant", "right": "control", "epoch": 0})
    with pytest.raises(ConsentError, match="never granted"):
        supporter.handle({"type": "revoke", "right": "view", "epoch": 0})
    with pytest.raises(ConsentError, match="does not show"):
        supporter.handle({"type": "request", "right": "view", "epoch": 0})
    with pytest.raises(ConsentError, match="not requested"):
        customer.handle({"type": "grant", "right": "view", "epoch": 0})
    with pytest.raises(ConsentError, match="epoch 3"):
        customer.handle({"type": "request", "right": "view", "epoch": 3})
    customer.handle({"type": "request", "right": "view", "epoch": 0})
    with pytest.raises(ConsentError, match="waits for an answer"):
        customer.handle({"type": "request", "right": "view", "epoch": 0})
    with pytest.raises(ConsentError, match="never sent"):
        supporter.handle({"type": "comment", "text": "a note"})
    with pytest.raises(ConsentError, match="claims"):
        customer.handle({"type": "emergency_stop", "who": "customer"})


def test_unanswered_request_times_out_as_no():
    pair = adhoc()
    pair.now = 100.0
    pair.supporter.take(pair.supporter.state.request(Right.CONTROL, now=100.0))
    pair.flush()
    question = pair.peer.events[-1]
    assert question.ask and question.deadline == 160.0
    assert pair.peer.state.next_deadline() == 160.0
    assert pair.peer.take(pair.peer.state.expire(159.9)) == Outcome([], [])
    pair.peer.take(pair.peer.state.expire(160.0))
    pair.flush()
    assert pair.supporter.events[-1] == RightDenied(Right.CONTROL, Role.CUSTOMER, "no answer in time")
    assert pair.peer.state.answer(question, True) == Outcome([], [])  # a late "yes" counts not
    assert not pair.peer.state.allows(Right.CONTROL)
    assert pair.peer.state.next_deadline() is None


# --- emergency stop -----------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["supporter", "peer"])
def test_emergency_stop_from_either_side_ends_everything(who):
    pair = adhoc()
    for right in Right:
        ask_and_answer(pair, right, right is not Right.FILES)
    pair.supporter.take(pair.supporter.state.request(Right.FILES))  # pending when the stop comes
    pair.flush()
    presser = getattr(pair, who)
    presser.take(presser.state.emergency_stop())
    pair.flush()
    by = presser.state.role
    for side in (pair.supporter, pair.peer):
        assert side.state.ended
        assert side.events[-4:] == [RightRevoked(Right.VIEW, by, "emergency stop"),
                                    RightRevoked(Right.CONTROL, by, "emergency stop"),
                                    EmergencyStopped(by), SessionEnded(by, "emergency stop")]
        assert side.kinds()[-4:] == ["right_revoked", "right_revoked", "emergency_stop", "ended"]
        assert side.state.awaiting() == {} and side.state.next_deadline() is None
    assert not any(pair.peer.state.allows(r) for r in Right)
    assert not any(pair.supporter.state.holds(r) for r in Right)
    # everything after the end is quietly over
    assert pair.peer.state.answer(Right.FILES, True) == Outcome([], [])
    assert pair.peer.state.handle({"type": "chat", "text": "late"}) == Outcome([], [])
    assert pair.supporter.state.emergency_stop() == Outcome([], [])


def test_emergency_stop_works_before_the_terms_too():
    pair = adhoc(accept=False)
    pair.peer.take(pair.peer.state.emergency_stop())
    pair.flush()
    assert pair.supporter.state.ended
    assert pair.supporter.events[-2:] == [EmergencyStopped(Role.CUSTOMER),
                                          SessionEnded(Role.CUSTOMER, "emergency stop")]


# --- direction change ---------------------------------------------------------------------------

def test_direction_change_needs_the_consent_of_whoever_would_show():
    pair = adhoc()
    ask_and_answer(pair, Right.CONTROL, True)
    customer, supporter = pair.peer.state, pair.supporter.state
    # the customer asks the supporter to show: the supporter is asked ...
    pair.peer.take(customer.request_direction())
    pair.flush()
    question = pair.supporter.events[-1]
    assert question == DirectionRequested(Role.CUSTOMER, ask=True, deadline=60.0)
    assert question_for(question) == \
        "The customer asks you to show your screen instead. Show your screen?"
    # ... and says no: nothing changes
    pair.supporter.take(supporter.answer(question, False))
    pair.flush()
    assert pair.peer.events[-1] == DirectionDenied(Role.SUPPORTER, "declined")
    assert customer.is_presenter and customer.allows(Right.CONTROL)
    # asked again, yes: the supporter shows, the customer views, earlier rights are gone
    pair.peer.take(customer.request_direction())
    pair.flush()
    pair.supporter.take(supporter.answer(pair.supporter.events[-1], True))
    pair.flush()
    for side in (pair.supporter, pair.peer):
        assert side.state.presenter is Role.SUPPORTER and side.state.epoch == 1
        assert side.events[-2:] == [DirectionChanged(Role.SUPPORTER, 1),
                                    RightGranted(Right.VIEW, Role.SUPPORTER)]
    assert supporter.allows(Right.VIEW) and not supporter.allows(Right.CONTROL)
    assert not customer.allows(Right.CONTROL) and customer.holds(Right.VIEW)
    # now the customer may ask the supporter for rights, and the supporter answers
    pair.peer.take(customer.request(Right.CONTROL))
    pair.flush()
    assert pair.supporter.events[-1].ask
    assert question_for(pair.supporter.events[-1]) == \
        "Allow the customer to control your mouse and keyboard?"
    pair.supporter.take(supporter.answer(Right.CONTROL, True))
    pair.flush()
    assert supporter.allows(Right.CONTROL) and customer.holds(Right.CONTROL)


def test_the_would_be_presenter_offering_to_show_is_its_own_consent():
    pair = adhoc()
    pair.supporter.take(pair.supporter.state.request_direction())
    pair.flush()
    # the customer was not asked: showing the supporter's screen needs only the supporter's consent
    assert not any(getattr(e, "ask", False) for e in pair.peer.events[-3:])
    assert pair.peer.kinds()[-3:] == ["direction_requested", "direction_changed", "right_granted"]
    assert pair.supporter.state.presenter is pair.peer.state.presenter is Role.SUPPORTER


def test_crossing_direction_requests_and_stale_messages_settle_on_one_direction():
    pair = adhoc()
    ask_and_answer(pair, Right.VIEW, True)
    pair.supporter.take(pair.supporter.state.request(Right.CONTROL))
    pair.deliver(pair.supporter)
    pair.peer.take(pair.peer.state.answer(Right.CONTROL, True))   # grant in flight ...
    pair.peer.take(pair.peer.state.request_direction())           # ... and both ask to swap
    pair.supporter.take(pair.supporter.state.request_direction())
    pair.flush()
    for side in (pair.supporter, pair.peer):
        assert side.state.presenter is Role.SUPPORTER and side.state.epoch == 1
        assert side.state.granted == {Right.VIEW}
    # a message from before the change that arrives after it is dropped
    assert pair.peer.state.handle({"type": "revoke", "right": "view", "epoch": 0}) == Outcome([], [])


def test_screen_streams_switch_at_the_grant_and_the_ack():
    """Issue 16 §3: SCREEN bytes from before a change that arrive after it are told apart: each
    side's stream switches epochs where it sent direction_grant or direction_ack."""
    for asker in ("viewer", "presenter", "both"):
        pair = adhoc()
        supporter, customer = pair.supporter.state, pair.peer.state
        if asker in ("viewer", "both"):
            pair.supporter.take(supporter.request_direction())
        if asker in ("presenter", "both"):
            pair.peer.take(customer.request_direction())
        if asker == "presenter":
            pair.deliver(pair.peer)
            pair.supporter.take(supporter.answer(pair.supporter.events[-1], True))
            # the supporter shows now; the customer's old screen bytes are still coming
            assert supporter.epoch == 1 and not supporter.screen_in_step
        else:
            pair.deliver(pair.supporter)
            if asker == "viewer":   # the customer swapped at once; the supporter's stream is old
                assert customer.epoch == 1 and not customer.screen_in_step
        pair.flush()
        for side in (supporter, customer):
            assert side.epoch == 1 and side.screen_in_step, asker
        assert supporter.is_presenter


def test_pause_and_resume_by_the_side_that_shows():
    pair = adhoc()
    ask_and_answer(pair, Right.VIEW, True)
    supporter, customer = pair.supporter.state, pair.peer.state
    with pytest.raises(ConsentUsageError, match="only the side that shows"):
        supporter.pause()
    pair.peer.take(customer.pause())
    assert customer.pause() == Outcome([], [])          # paused already: nothing
    pair.flush()
    assert supporter.paused and customer.paused
    assert pair.supporter.kinds()[-1] == pair.peer.kinds()[-1] == "screen_paused"
    assert pair.supporter.events[-1].detail() == {"by": "customer"}
    with pytest.raises(ConsentError, match="paused already"):
        supporter.handle({"type": "pause", "epoch": 0})
    with pytest.raises(ConsentError, match="sent to the side that shows"):
        customer.handle({"type": "resume", "epoch": 0})
    pair.peer.take(customer.resume())
    pair.flush()
    assert not supporter.paused and pair.supporter.kinds()[-1] == "screen_resumed"
    # a direction change ends a pause
    pair.peer.take(customer.pause())
    pair.supporter.take(supporter.request_direction())
    pair.flush()
    assert not supporter.paused and not customer.paused and supporter.is_presenter


def test_host_policy_decides_instead_of_a_person():
    pair = host({"view": "allow", "control": "allow", "files": "deny"})
    for right in Right:
        pair.supporter.take(pair.supporter.state.request(right))
    pair.flush()
    assert pair.peer.events == [
        RightRequested(Right.VIEW, Role.SUPPORTER), RightGranted(Right.VIEW, Role.HOST),
        RightRequested(Right.CONTROL, Role.SUPPORTER), RightGranted(Right.CONTROL, Role.HOST),
        RightRequested(Right.FILES, Role.SUPPORTER),
        RightDenied(Right.FILES, Role.HOST, "host policy")]
    assert [pair.peer.state.allows(r) for r in Right] == [True, True, False]

    pair = host({"control": "ask", "view": "allow"})  # files: the default, ask
    pair.supporter.take(pair.supporter.state.request(Right.CONTROL))
    pair.flush()
    assert pair.peer.events[-1] == RightRequested(Right.CONTROL, Role.SUPPORTER, ask=True,
                                                  deadline=60.0)
    pair.peer.take(pair.peer.state.expire(60.0))  # nobody logged in answers
    pair.flush()
    assert pair.supporter.events[-1] == RightDenied(Right.CONTROL, Role.HOST, "no answer in time")

    # a host asked to show again after a direction change follows its view policy
    for view, changed in (("allow", True), ("deny", False)):
        pair = host({"view": view})
        pair.supporter.take(pair.supporter.state.request_direction())
        pair.flush()
        assert pair.peer.state.presenter is Role.SUPPORTER
        pair.supporter.take(pair.supporter.state.request_direction())
        pair.flush()
        assert (pair.peer.state.presenter is Role.HOST) is changed

    with pytest.raises(ValueError):
        ConsentState(Role.HOST, policy={"control": "maybe"})
    with pytest.raises(ValueError):
        ConsentState(Role.HOST, policy={"screen": "allow"})
    with pytest.raises(ValueError):
        ConsentState(Role.CUSTOMER, policy={"view": "allow"})


# --- chat, comments, the protocol ---------------------------------------------------------------

def test_chat_reaches_the_peer_and_comments_only_the_protocol():
    pair = adhoc()
    pair.supporter.take(pair.supporter.state.chat("Bitte einmal neu starten"))
    comment = pair.supporter.take(pair.supporter.state.comment("customer seems in a hurry"))
    assert comment.messages == []  # never sent
    pair.flush()
    assert pair.peer.events[-1] == Chat(Role.SUPPORTER, "Bitte einmal neu starten")
    assert not any(isinstance(e, Comment) for e in pair.peer.events)
    assert pair.supporter.events[-1].protocol_event() == {
        "kind": "comment", "detail": {"by": "supporter", "text": "customer seems in a hurry"}}
    with pytest.raises(ConsentUsageError):
        pair.peer.state.comment("customers do not comment")
    with pytest.raises(ConsentUsageError):
        pair.supporter.state.chat("\x1b[2J")  # no terminal control sequences


def test_every_state_change_yields_a_protocol_event():
    pair = adhoc()
    ask_and_answer(pair, Right.VIEW, True)
    pair.peer.take(pair.peer.state.enforce(Right.CONTROL, "pointer event"))
    pair.peer.take(pair.peer.state.request_direction())
    pair.flush()
    pair.supporter.take(pair.supporter.state.answer(Question.DIRECTION, True))
    pair.supporter.take(pair.supporter.state.chat("hi"))
    pair.supporter.take(pair.supporter.state.comment("note"))
    pair.flush()
    pair.peer.take(pair.peer.state.end("done"))
    pair.flush()
    assert pair.peer.kinds() == [
        "terms_shown", "terms_accepted", "right_requested", "right_granted", "right_refused",
        "direction_requested", "direction_changed", "right_granted", "chat", "ended"]
    assert pair.supporter.kinds() == [
        "terms_shown", "terms_accepted", "right_requested", "right_granted",
        "direction_requested", "direction_changed", "right_granted", "chat", "comment", "ended"]
    for side in (pair.supporter, pair.peer):
        for event in side.events:
            line = event.protocol_event()
            assert set(line) == {"kind", "detail"}
            assert len(json.dumps(line["detail"])) < 16 * 1024


# --- hostile control messages -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                        max_size=4),
    max_leaves=12)
# objects that look a lot like control messages, so the checks behind the type are exercised
near_messages = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(sorted(SCHEMA) + ["grant_all", ""]),
    st.dictionaries(st.sampled_from(["text", "sha256", "right", "epoch", "reason", "who", "x"]),
                    json_values | st.sampled_from(["view", "control", "files", "customer",
                                                   "supporter", 0, 1, -1, "0" * 64]),
                    max_size=4))


def fresh_states():
    pair = adhoc()
    return [pair.peer.state, pair.supporter.state, adhoc(accept=False).peer.state,
            ConsentState(Role.HOST, policy={"view": "allow"}), ConsentState(Role.SUPPORTER, peer=Role.HOST)]


@FAST
@given(json_values | near_messages)
def test_arbitrary_json_raises_consent_error_only(message):
    for state in fresh_states():
        try:
            outcome = state.handle(message)
        except ConsentError:
            continue
        # what passed is a valid message, and the answer is valid too
        validate_message(message)
        for reply in outcome.messages:
            assert decode_message(encode_message(reply))


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_raise_consent_error_only(data):
    for state in fresh_states():
        try:
            state.receive(data)
        except ConsentError:
            pass


@pytest.mark.parametrize("data, reason", [
    (b'{"type":"request","right":"control"}', "missing"),
    (b'{"type":"request","right":"control","epoch":0,"all":true}', "unexpected"),
    (b'{"type":"request","right":"root","epoch":0}', "unknown right"),
    (b'{"type":"request","right":"control","epoch":true}', "epoch"),
    (b'{"type":"request","right":"control","epoch":1.0}', "epoch"),
    (b'{"type":"request","right":"control","epoch":-1}', "epoch"),
    (b'{"type":"grant_everything"}', "unknown control message type"),
    (b'["request"]', "JSON object"),
    (b'{"type":"chat","text":""}', "1-2000"),
    (b'{"type":"chat","text":"' + b"x" * 2001 + b'"}', "1-2000"),
    (b'{"type":"chat","text":"\\u001b[31mred"}', "control character"),
    (b'{"type":"chat","text":"\\ud800"}', "surrogate"),
    (b'{"type":"bye","reason":"two\\nlines"}', "control character"),
    (b'{"type":"terms_accepted","sha256":"ABC"}', "64 lower-case hex"),
    (b'{"type":"emergency_stop","who":"admin"}', "unknown role"),
    (b'{"type":"chat","text":"a","text":"b"}', "twice"),
    (b'{"type":"request","right":"view","epoch":NaN}', "not JSON"),
    (b'\xff\xfe', "not UTF-8 JSON"),
    (b'[' * 100_000, "exceeds"),
    (b'[' * 60_000, "not UTF-8 JSON"),
    (b'{"type":"terms","text":"' + b"x" * MAX_MESSAGE_BYTES + b'"}', "exceeds"),
])
def test_invalid_control_messages_are_refused_with_a_reason(data, reason):
    with pytest.raises(ConsentError, match=reason):
        ConsentState(Role.CUSTOMER).receive(data)


def test_messages_encode_to_what_the_peer_accepts():
    for message in ({"type": "terms", "text": TERMS}, {"type": "grant", "right": Right.VIEW, "epoch": 2},
                    {"type": "emergency_stop", "who": Role.HOST}, {"type": "bye", "reason": "done"}):
        decoded = decode_message(encode_message(message))
        assert decoded == message  # str enums compare equal to their values
        assert all(type(decoded[k]) is type(v) for k, v in message.items())
    assert "ÄÖÜ ✓".encode() in encode_message({"type": "terms", "text": TERMS})  # UTF-8, unescaped
    with pytest.raises(ConsentError):
        encode_message({"type": "chat", "text": "x" * 3000})
    with pytest.raises(ConsentError):
        encode_message({"type": "grant", "right": "view"})


# --- the Twisted driver -------------------------------------------------------------------------

@implementer(IConsentUI)
class ScriptedUI:
    """A UI whose answers the test gives by firing the Deferreds it handed out."""

    def __init__(self) -> None:
        self.questions: list[tuple[str, Right | None, defer.Deferred]] = []
        self.terms: list[tuple[str, defer.Deferred]] = []
        self.notified: list = []

    def show_terms(self, text):
        d = defer.Deferred()
        self.terms.append((text, d))
        return d

    def ask(self, question, right):
        d = defer.Deferred()
        self.questions.append((question, right, d))
        return d

    def notify(self, event):
        self.notified.append(event)


def driven_pair(clock):
    sent_to_customer: list[bytes] = []
    sent_to_supporter: list[bytes] = []
    reports: list[dict] = []
    ui = ScriptedUI()
    customer = ConsentDriver(ConsentState(Role.CUSTOMER, terms=TERMS), ui, clock,
                             sent_to_supporter.append, reports.append)
    supporter = ConsentState(Role.SUPPORTER, peer=Role.CUSTOMER, terms=TERMS)
    return customer, supporter, ui, sent_to_customer, sent_to_supporter, reports


def test_driver_puts_questions_to_the_ui_and_times_them_out_with_the_clock():
    clock = task.Clock()
    customer, supporter, ui, _, to_supporter, reports = driven_pair(clock)
    customer.start()
    assert ui.terms[0][0] == TERMS
    ui.terms[0][1].callback(True)
    supporter.receive(to_supporter.pop(0))
    assert supporter.terms_accepted

    for right in (Right.VIEW, Right.CONTROL):
        customer.received(encode_message(supporter.request(right).messages[0]))
    assert [(q, r) for q, r, _ in ui.questions] == [
        ("Allow the supporter to see your screen?", Right.VIEW),
        ("Allow the supporter to control your mouse and keyboard?", Right.CONTROL)]
    ui.questions[0][2].callback(True)
    assert decode_message(to_supporter.pop(0))["type"] == "grant"
    clock.advance(59)
    assert not ui.questions[1][2].called
    clock.advance(1)  # the control question times out: "no", and the UI withdraws it
    assert ui.questions[1][2].called
    assert decode_message(to_supporter.pop(0)) == {
        "type": "deny", "right": Right.CONTROL, "reason": "no answer in time", "epoch": 0}
    assert customer.enforce(Right.VIEW, "frame request")
    assert not customer.enforce(Right.CONTROL, "pointer event")
    assert [r["kind"] for r in reports] == [
        "terms_shown", "terms_accepted", "right_requested", "right_requested", "right_granted",
        "right_denied", "right_refused"]
    assert not customer.ended.called
    assert clock.getDelayedCalls() == []


def test_driver_ends_the_session_on_a_bad_message_and_on_emergency_stop():
    clock = task.Clock()
    customer, supporter, ui, _, to_supporter, reports = driven_pair(clock)
    customer.start()
    ended = []
    customer.ended.addCallback(ended.append)
    customer.received(b'{"type":"grant_everything"}')
    assert ended == [SessionEnded(Role.CUSTOMER, "bad control message: unknown control message "
                                                 "type 'grant_everything'")]
    assert decode_message(to_supporter[-1])["type"] == "bye"
    assert ui.terms[0][1].called  # the terms question was withdrawn
    assert clock.getDelayedCalls() == []

    customer, supporter, ui, _, to_supporter, reports = driven_pair(clock)
    customer.start()
    ui.terms[0][1].callback(True)
    customer.emergency_stop()
    assert decode_message(to_supporter[-1]) == {"type": "emergency_stop", "who": Role.CUSTOMER}
    assert customer.ended.called
    assert [r["kind"] for r in reports][-2:] == ["emergency_stop", "ended"]


def test_driver_refuses_a_ui_that_does_not_implement_the_interface():
    with pytest.raises(TypeError):
        ConsentDriver(ConsentState(Role.CUSTOMER), object(), task.Clock(), print, print)


# --- the terminal ---------------------------------------------------------------------------------

class Pipe:
    """Scripted answers through a real pipe, as a wrapper or a test would give them."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.input = os.fdopen(r, "r", encoding="utf-8")
        self._w = w

    def write(self, text: str) -> None:
        os.write(self._w, text.encode())

    def close(self) -> None:
        if self._w is not None:
            os.close(self._w)
            self._w = None


@pytest.fixture
def pipe():
    p = Pipe()
    yield p
    p.close()


@pytest_twisted.ensureDeferred
async def test_terminal_asks_plain_questions_and_reads_one_line_each(pipe):
    out = io.StringIO()
    ui = TerminalConsentUI(pipe.input, out, me=Role.CUSTOMER)
    terms = ui.show_terms(TERMS)
    control = ui.ask("Allow the supporter to control your mouse and keyboard?", Right.CONTROL)
    files = ui.ask("Allow the supporter to transfer files to and from this computer?", Right.FILES)
    assert "Allow the supporter" not in out.getvalue()  # one question at a time
    pipe.write("ja\n")
    assert await terms is True
    pipe.write("y\n\n")
    assert await control is True
    assert await files is False  # an empty line is the default, no
    view = ui.ask("Allow the supporter to see your screen?", Right.VIEW)
    pipe.write("no\n")
    assert await view is False
    rule = "-" * 72
    assert out.getvalue() == (
        f"\nSupport terms\n{rule}\n{TERMS}\n{rule}\nDo you accept these terms? [y/N] ja\n"
        "Allow the supporter to control your mouse and keyboard? [y/N] y\n"
        "Allow the supporter to transfer files to and from this computer? [y/N] \n"
        "Allow the supporter to see your screen? [y/N] no\n")
    ui.notify(RightGranted(Right.CONTROL, Role.CUSTOMER))
    ui.notify(Comment(Role.SUPPORTER, "never on the customer's screen"))
    ui.notify(Chat(Role.SUPPORTER, "hallo\x1b[2J"))
    assert out.getvalue().endswith("You granted control.\nThe supporter writes: hallo[2J\n")
    pipe.close()
    late = ui.ask("Allow the supporter to see your screen?", Right.VIEW)
    assert await late is False  # end of input: no


@pytest_twisted.ensureDeferred
async def test_terminal_withdraws_a_timed_out_question_and_goes_on(pipe):
    out = io.StringIO()
    ui = TerminalConsentUI(pipe.input, out)
    first = ui.ask("Allow the supporter to see your screen?", Right.VIEW)
    second = ui.ask("Allow the supporter to control your mouse and keyboard?", Right.CONTROL)
    first.cancel()
    with pytest.raises(defer.CancelledError):
        await first
    assert "(no answer in time: no)\nAllow the supporter to control" in out.getvalue()
    pipe.write("y\n")
    assert await second is True


@pytest_twisted.ensureDeferred
async def test_customer_consent_runs_through_the_terminal_end_to_end(pipe):
    """The customer's driver with terminal questions, the supporter's state on the other end."""
    from twisted.internet import reactor

    out = io.StringIO()
    supporter = ConsentState(Role.SUPPORTER, peer=Role.CUSTOMER, terms=TERMS)
    to_supporter: list[bytes] = []
    reports: list[dict] = []
    arrived = defer.DeferredQueue()

    def send(data: bytes) -> None:  # the network is never synchronous
        to_supporter.append(data)
        reactor.callLater(0, arrived.put, data)

    customer = ConsentDriver(ConsentState(Role.CUSTOMER), TerminalConsentUI(pipe.input, out),
                             reactor, send, reports.append)
    customer.start()
    customer.received(encode_message(supporter.start().messages[0]))
    pipe.write("y\n")
    supporter.receive(await arrived.get())
    assert supporter.terms_accepted
    for right, answer in ((Right.VIEW, "y"), (Right.CONTROL, "n"), (Right.FILES, "yes")):
        customer.received(encode_message(supporter.request(right).messages[0]))
        pipe.write(answer + "\n")
        supporter.receive(await arrived.get())
    assert [supporter.holds(r) for r in Right] == [True, False, True]
    assert [customer.state.allows(r) for r in Right] == [True, False, True]
    assert "Allow the supporter to control your mouse and keyboard? [y/N] n\n" in out.getvalue()
    assert "The customer refused control (declined).\n" in out.getvalue()
    customer.emergency_stop()
    supporter.receive(await arrived.get())
    assert supporter.ended and customer.ended.called
    assert [r["kind"] for r in reports] == [
        "terms_shown", "terms_accepted",
        "right_requested", "right_granted", "right_requested", "right_denied",
        "right_requested", "right_granted",
        "right_revoked", "right_revoked", "emergency_stop", "ended"]


def test_answers_can_come_from_an_inherited_descriptor_or_a_file(tmp_path):
    from modules.common.terminal.consent_terminal import open_answers

    r, w = os.pipe()
    os.write(w, b"y\n")
    os.close(w)
    with open_answers(str(r)) as stream:
        assert stream.readline() == "y\n"
    script = tmp_path / "answers"
    script.write_text("n\ny\n")
    with open_answers(str(script)) as stream:
        assert stream.read() == "n\ny\n"
