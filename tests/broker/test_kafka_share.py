"""How a group's leader shares partitions out (runner/broker/kafka_groups.share): every
partition held by exactly one member, nothing taken from a member still in the group
without a release first, balanced once the releases are done, refused members given
nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runner.broker.kafka_groups import Member, share, spec_difference

TOPICS = ["a", "b"]


@st.composite
def groups(draw):
    partitions = [(t, p) for t in TOPICS[: draw(st.integers(1, 2))] for p in range(draw(st.integers(0, 7)))]
    ids = [f"m{i}" for i in range(draw(st.integers(1, 5)))]
    # What members own is disjoint (the protocol never gives a partition to two).
    owners = draw(st.lists(st.sampled_from([None, *ids]), min_size=len(partitions), max_size=len(partitions)))
    members = {m: Member([tp for tp, o in zip(partitions, owners) if o == m]) for m in ids}
    return members, partitions


def check_round(members: dict[str, Member], partitions: list) -> dict:
    shares = share(members, partitions)
    held = [tp for s in shares.values() for tp in s.assigned]
    assert sorted(held) == sorted(partitions), "each partition held by exactly one member"
    for m, member in members.items():
        for tp in member.owned:
            assert tp in shares[m].assigned, "an owner keeps its partition until it releases it"
        assert set(shares[m].release) <= set(member.owned)
    return shares


@settings(max_examples=300, deadline=None)
@given(groups())
def test_shares_are_exclusive_sticky_and_balance_after_the_releases(group) -> None:
    members, partitions = group
    before = {m: set(member.owned) for m, member in members.items()}
    shares = check_round(members, partitions)
    # Next round: each member owns what it kept (releases done).
    members = {m: Member([tp for tp in s.assigned if tp not in s.release]) for m, s in shares.items()}
    shares = check_round(members, partitions)
    assert not any(s.release for s in shares.values()), "one round of releases suffices"
    counts = [len(s.assigned) for s in shares.values()]
    assert max(counts) - min(counts) <= 1
    for t in {tp[0] for tp in partitions}:
        per_topic = [sum(1 for tp in s.assigned if tp[0] == t) for s in shares.values()]
        assert max(per_topic) - min(per_topic) <= 1 or any(m.owned for m in members.values())
    # Sticky: a member keeps what it owned, up to its fair share.
    fair = len(partitions) // len(members)
    for m, owned in before.items():
        kept = owned & set(shares[m].assigned)
        assert len(kept) >= min(len(owned), fair)


def test_a_member_joining_takes_only_what_the_others_release() -> None:
    partitions = [("t", p) for p in range(4)]
    first = share({"a": Member(partitions), "b": Member([])}, partitions)
    assert first["a"].assigned == partitions and first["a"].release == [("t", 2), ("t", 3)]
    assert first["b"].assigned == []
    second = share({"a": Member(partitions[:2]), "b": Member([])}, partitions)
    assert second["a"].assigned == partitions[:2] and second["b"].assigned == partitions[2:]
    # A member that left or died owns nothing: its partitions go at once.
    assert share({"b": Member(partitions[2:])}, partitions)["b"].assigned == partitions


def test_a_member_on_another_spec_is_given_nothing_and_told_the_difference() -> None:
    partitions = [("t", p) for p in range(2)]
    spec = {"topic 'a'": "1", "source 'logs'": "2"}
    other = {"topic 'a'": "1", "source 'logs'": "3", "sink 'extra'": "4"}
    shares = share({"old": Member(partitions, {"spec": spec}), "new": Member([], {"spec": other})}, partitions)
    assert shares["old"].assigned == partitions and shares["old"].refused is None
    assert shares["new"].assigned == [] and shares["new"].refused == spec
    assert spec_difference(other, spec) == "differs in source 'logs'; has sink 'extra' which the others lack"


# -- one member's bookkeeping through rebalances (runner/broker/kafka_groups.Holdings) -----


@st.composite
def histories(draw):
    """Steps of a group's life: rounds (some members' releases finishing while the round's
    metadata is on its way, so the leader works from older news), releases finishing
    between rounds, members joining and dying."""
    return draw(st.lists(st.tuples(st.sampled_from(["round", "release", "join", "die"]), st.integers(0, 7),
                                   st.integers(0, 3)), min_size=1, max_size=40))


def working(members: dict) -> list:
    """What each live member works on: active, or still stopping (being released)."""
    return [tp for h in members.values() for tp in h.active() | h.releasing]


@settings(max_examples=300, deadline=None)
@given(histories())
def test_no_partition_is_ever_worked_on_by_two_members_and_all_are_worked_on_in_the_end(history) -> None:
    from runner.broker.kafka_groups import Holdings

    partitions = [("t", p) for p in range(5)]
    members: dict[str, Holdings] = {"m0": Holdings()}
    pending: dict[str, set] = {}  # releases under way, per member
    names = iter(f"m{i}" for i in range(1, 100))

    def finish(m: str) -> None:
        if pending.get(m):
            members[m].release_done(pending.pop(m), ok=True)

    def round_(late: int) -> None:
        # Metadata goes out; then `late` members finish a release before the answer.
        told = {m: (h.joining(), Member(h.owned()))[1] for m, h in members.items()}
        for m in list(pending)[:late]:
            finish(m)
        shares = share(told, partitions)
        for m, h in members.items():
            _lost, release = h.assigned(set(shares[m].assigned), set(shares[m].release))
            if release:
                pending[m] = pending.get(m, set()) | release

    for step, n, late in history:
        if step == "round":
            round_(late)
        elif step == "release" and pending:
            finish(sorted(pending)[n % len(pending)])
        elif step == "join" and len(members) < 4:
            members[next(names)] = Holdings()
        elif step == "die" and len(members) > 1:
            dead = sorted(members)[n % len(members)]
            del members[dead]
            pending.pop(dead, None)
        held = working(members)
        assert len(held) == len(set(held)), f"a partition worked on twice after {step}"
    # Quiet again: releases finish, rounds go on until no member is behind.
    for _ in range(4):
        for m in list(pending):
            finish(m)
        round_(0)
    held = sorted(working(members))
    assert held == partitions
    counts = [len(h.active()) for h in members.values()]
    assert max(counts) - min(counts) <= 1
