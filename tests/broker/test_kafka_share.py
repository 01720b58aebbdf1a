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
