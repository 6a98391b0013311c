"""Data generations: the comparison every reconnect relies on, and the crash-safe file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cluster.generation import (
    HISTORY_MAX,
    WIRE_MAX,
    Generation,
    GenerationError,
    GenerationFileError,
    GenerationStore,
    Origin,
    Relation,
    compare,
    new_id,
)

G1, G2, G3, G4 = "a1" * 6, "b2" * 6, "c3" * 6, "d4" * 6


def in_sync(gen_id: str = G1) -> Generation:
    return Generation(current=gen_id, history=(), origin=Origin.NONE)


def test_first_start_both_fresh_is_unknown() -> None:
    assert compare(Generation(), Generation()) is Relation.UNKNOWN


def test_first_prim_makes_the_other_side_need_a_full_copy() -> None:
    a = Generation().started(G1, Origin.FORCED)
    b = Generation()
    assert a.history == () and a.journal_base is None
    assert compare(a, b) is Relation.LOCAL_NEWER_FULL
    assert compare(b, a) is Relation.PEER_NEWER_FULL
    b2 = b.marked_inconsistent().adopted(a)
    assert compare(a.peer_synced(), b2) is Relation.EQUAL


def test_in_sync_pair_is_equal() -> None:
    assert compare(in_sync(), in_sync()) is Relation.EQUAL


def test_failover_then_old_primary_returns_gets_a_full_pass_after_a_crash() -> None:
    old_primary = in_sync().with_primary(True)  # crashed while primary
    survivor = in_sync().started(G2, Origin.FAILOVER).with_primary(True)
    assert survivor.journal_base == G1 and survivor.history == (G1,)
    # The crashed primary may hold writes never acknowledged: a checksum pass, not the journal.
    assert compare(old_primary, survivor) is Relation.PEER_NEWER_FULL
    assert compare(survivor, old_primary) is Relation.LOCAL_NEWER_FULL


def test_secondary_that_stopped_cleanly_resyncs_incrementally() -> None:
    primary = in_sync().started(G2, Origin.PRIMARY)
    secondary = in_sync()
    assert compare(secondary, primary) is Relation.PEER_NEWER
    assert compare(primary, secondary) is Relation.LOCAL_NEWER


def test_journal_base_survives_two_alone_generations() -> None:
    primary = in_sync().started(G2, Origin.PRIMARY).started(G3, Origin.FORCED)
    assert primary.journal_base == G1 and primary.history == (G2, G1)
    assert compare(primary, in_sync()) is Relation.LOCAL_NEWER


def test_journal_base_not_matching_means_full() -> None:
    primary = in_sync().started(G2, Origin.PRIMARY).peer_synced().started(G3, Origin.PRIMARY)
    assert primary.journal_base == G2
    assert compare(primary, in_sync(G1)) is Relation.LOCAL_NEWER_FULL


def test_both_forced_alone_diverge() -> None:
    a = in_sync().started(G2, Origin.PRIMARY)
    b = in_sync().started(G3, Origin.FAILOVER)
    assert compare(a, b) is Relation.DIVERGED
    assert compare(b, a) is Relation.DIVERGED
    assert Relation.DIVERGED.full


def test_double_power_loss_the_crashed_primary_is_newer() -> None:
    a = in_sync().with_primary(True)
    b = in_sync()
    assert compare(a, b) is Relation.LOCAL_NEWER_FULL
    assert compare(b, a) is Relation.PEER_NEWER_FULL


def test_double_power_loss_after_failover_the_survivor_is_newer() -> None:
    a = in_sync().with_primary(True)
    b = in_sync().started(G2, Origin.FAILOVER).with_primary(True)
    assert compare(b, a).local_newer
    assert compare(a, b).peer_newer


def test_both_primary_on_the_same_generation_is_divergence() -> None:
    a = in_sync().with_primary(True)
    assert compare(a, a) is Relation.DIVERGED


def test_stopped_mid_resync_is_inconsistent_and_loses() -> None:
    source = in_sync().started(G2, Origin.PRIMARY)
    target = in_sync().marked_inconsistent()
    # Resume the incremental: the journal still counts from the target's generation.
    assert compare(target, source) is Relation.PEER_NEWER
    assert compare(source, target) is Relation.LOCAL_NEWER
    # A full resync interrupted on an equal generation stays full.
    same = in_sync().marked_inconsistent()
    assert compare(same, in_sync()) is Relation.PEER_NEWER_FULL
    assert compare(Generation().marked_inconsistent(), source) is Relation.PEER_NEWER_FULL


def test_primforce_on_inconsistent_then_peer_returns_diverged_full() -> None:
    target = in_sync().marked_inconsistent()
    forced = target.started(G3, Origin.FORCED)
    assert not forced.inconsistent and forced.journal_base is None
    source = in_sync().started(G2, Origin.PRIMARY)
    assert compare(source, forced) is Relation.DIVERGED
    assert compare(forced, source).full


def test_both_inconsistent_or_source_fresh_is_unknown() -> None:
    x = in_sync().marked_inconsistent()
    assert compare(x, x) is Relation.UNKNOWN
    assert compare(x, Generation()) is Relation.UNKNOWN


def test_history_is_bounded() -> None:
    gen = Generation()
    for i in range(HISTORY_MAX + 5):
        gen = gen.started(f"{i:012x}", Origin.PRIMARY)
    assert len(gen.history) == HISTORY_MAX


def test_new_id_is_hex_and_random() -> None:
    a, b = new_id(), new_id()
    assert a != b and int(a, 16) >= 0


# ------------------------------------------------------------ file


def test_missing_file_is_unknown(tmp_path: Path) -> None:
    assert GenerationStore(tmp_path).load() == Generation()


def test_save_load_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path)
    gen = in_sync().started(G2, Origin.FAILOVER).with_primary(True).marked_inconsistent()
    store.save(gen)
    assert store.load() == gen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"current": 3}',
        json.dumps({**in_sync().to_json(), "history": ["../etc"]}).encode(),
        json.dumps({**in_sync().to_json(), "primary": "yes"}).encode(),
        json.dumps({**in_sync().to_json(), "origin": "magic"}).encode(),
        b"\xff\xfe",
    ],
)
def test_corrupted_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    store = GenerationStore(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(GenerationFileError) as info:
        store.load()
    assert str(store.path) in str(info.value)


def test_unwritable_directory_names_the_file(tmp_path: Path) -> None:
    store = GenerationStore(tmp_path / "missing-dir")
    with pytest.raises(GenerationFileError) as info:
        store.save(in_sync())
    assert "generation.json" in str(info.value)


# ------------------------------------------------------------ wire form

ids = st.text("0123456789abcdef", min_size=12, max_size=12)
generations = st.builds(
    Generation,
    current=st.one_of(st.just(""), ids),
    history=st.lists(ids, max_size=HISTORY_MAX).map(tuple),
    journal_base=st.one_of(st.none(), ids),
    inconsistent=st.booleans(),
    primary=st.booleans(),
    origin=st.sampled_from(Origin),
)


@given(generations)
def test_wire_roundtrip_keeps_everything_but_old_history(gen: Generation) -> None:
    text = gen.to_wire()
    assert len(text) <= WIRE_MAX
    back = Generation.from_wire(text)
    assert back.history == gen.history[: len(back.history)]
    assert back == Generation(
        gen.current, back.history, gen.journal_base, gen.inconsistent, gen.primary, gen.origin
    )
    assert len(back.history) >= min(len(gen.history), 7)


@given(st.text(max_size=200))
def test_from_wire_raises_only_generation_error(text: str) -> None:
    try:
        gen = Generation.from_wire(text)
    except GenerationError:
        return
    assert Generation.from_wire(gen.to_wire()) == gen


@given(generations, generations)
def test_compare_is_antisymmetric(a: Generation, b: Generation) -> None:
    mirror = {
        Relation.EQUAL: Relation.EQUAL,
        Relation.LOCAL_NEWER: Relation.PEER_NEWER,
        Relation.LOCAL_NEWER_FULL: Relation.PEER_NEWER_FULL,
        Relation.PEER_NEWER: Relation.LOCAL_NEWER,
        Relation.PEER_NEWER_FULL: Relation.LOCAL_NEWER_FULL,
        Relation.DIVERGED: Relation.DIVERGED,
        Relation.UNKNOWN: Relation.UNKNOWN,
    }
    assert compare(b, a) is mirror[compare(a, b)]
