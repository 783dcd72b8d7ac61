"""Crash safety: SIGKILL the server at random moments while a client writes, then check.

One data folder lives through every round. Each round starts a server, writes from this thread
(upserts of new and existing ids, deletes of acknowledged ids) until a timer kills the server
with SIGKILL, and records only what was acknowledged. The call in flight at the kill is
"unknown": its ids may show the old or the new state, but the whole batch one or the other.
After each restart every id ever written must be in a state the history allows, the count must
match, and searches must find stored vectors (the index was recovered, not just the store).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from clipsearch import Client, ClipSearchError
from conftest import Engine, ServerProcess

ROUNDS = 20
SEED = 20240611
DIM = 64
COLLECTION = "crash"
KILL_AFTER_S = (0.2, 1.2)  # a kill lands this long after the server is ready
# Background snapshot interval per round, cycled: None keeps the default (no snapshot before
# the kill), the short ones make kills land during snapshots too.
SNAPSHOT_INTERVALS: tuple[float | None, ...] = (None, 0.3, 0.1)
SEARCH_CHECKS = 8  # stored vectors searched for after each restart

# What an id may be after a restart: absent (None) or (unit vector, metadata).
State = tuple[np.ndarray, dict] | None


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def same_state(a: State, b: State) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a[0], b[0], atol=1e-6)) and a[1] == b[1]


@dataclass
class InFlight:
    """The call a kill interrupted: its ids and the state each would have had."""

    kind: str
    ids: list[str]
    new: list[State]
    telling: list[bool] = field(default_factory=list)  # the new state was not possible before


@dataclass
class Truth:
    """Every id ever written, with the states it may be in; one state once known."""

    possible: dict[str, list[State]] = field(default_factory=dict)
    in_flight: InFlight | None = None

    def acknowledged(self, ids: list[str], states: list[State]) -> None:
        for id_, state in zip(ids, states, strict=True):
            self.possible[id_] = [state]

    def interrupted(self, call: InFlight) -> None:
        for id_, state in zip(call.ids, call.new, strict=True):
            before = self.possible.get(id_, [None])
            telling = not any(same_state(s, state) for s in before)
            call.telling.append(telling)
            self.possible[id_] = [*before, state] if telling else before
        self.in_flight = call

    def known_present(self) -> list[str]:
        return [i for i, p in self.possible.items() if len(p) == 1 and p[0] is not None]


def observe(client: Client, ids: list[str]) -> dict[str, State]:
    """The stored state of every id: absent ids map to None."""
    found = {r.id: r for r in client.get(COLLECTION, ids, include_vectors=True)}
    return {i: (found[i].vector, found[i].metadata) if i in found else None for i in ids}


def verify(client: Client, truth: Truth, rng: np.random.Generator, recent: list[str]) -> None:
    """Every id is in a state its history allows; count and index agree with the store."""
    ids = list(truth.possible)
    seen = observe(client, ids)
    for id_ in ids:
        allowed = truth.possible[id_]
        assert any(same_state(seen[id_], s) for s in allowed), (
            f"{id_}: stored {'nothing' if seen[id_] is None else seen[id_][1]}, allowed "
            f"{[None if s is None else s[1] for s in allowed]}"
        )
    call = truth.in_flight
    if call is not None:  # one transaction: all of the interrupted batch or none of it
        landed = {same_state(seen[i], s)
                  for i, s, telling in zip(call.ids, call.new, call.telling, strict=True)
                  if telling}
        assert len(landed) <= 1, f"interrupted {call.kind} of {call.ids} landed in part"
    truth.acknowledged(ids, [seen[i] for i in ids])  # unknowns are resolved now
    truth.in_flight = None

    present = truth.known_present()
    count = client.count(COLLECTION)
    assert count == len(present)
    if not present:
        return
    # Stored vectors find themselves: the newest writes (replayed after the snapshot), the
    # interrupted call's items where they landed, and others at random.
    newest = [*recent, *(call.ids if call else [])]
    chosen = [i for i in reversed(newest) if seen.get(i) is not None][:SEARCH_CHECKS // 2]
    others = rng.choice(present, size=min(SEARCH_CHECKS, len(present)), replace=False)
    for id_ in [*chosen, *others.tolist()]:
        vector, metadata = seen[id_]
        hits = client.search(COLLECTION, vector=vector, k=3, ef=256)
        assert hits[0].id == id_, f"searching {id_} by its vector found {hits[0].id}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata == metadata
    # A graph that kept a deleted item (or lost a stored one) returns fewer than k hits.
    live = set(present)
    for query in rng.normal(size=(3, DIM)):
        k = min(50, count)
        hits = client.search(COLLECTION, vector=query, k=k, ef=256)
        assert len(hits) == k
        assert len({h.id for h in hits}) == k
        assert {h.id for h in hits} <= live


def write_until_killed(client: Client, truth: Truth, rng: np.random.Generator, round_: int,
                       killed: threading.Event, recent: list[str]) -> int:
    """Upserts and deletes until a call fails because of the kill; returns calls acknowledged."""
    calls = 0
    serial = 0
    while True:
        known = truth.known_present()
        if known and rng.random() < 0.15:
            ids = rng.choice(known, size=min(len(known), int(rng.integers(1, 6))),
                             replace=False).tolist()
            call = InFlight("delete", ids, [None] * len(ids))
        else:
            n = int(rng.integers(1, 21))
            existing = list(truth.possible)
            reuse = min(len(existing), int(rng.binomial(n, 0.2)))
            ids = rng.choice(existing, size=reuse, replace=False).tolist() if reuse else []
            while len(ids) < n:
                ids.append(f"r{round_}-{serial}")
                serial += 1
            vectors = rng.normal(size=(n, DIM)).astype(np.float32)
            metadata = [{"round": round_, "i": j, "even": j % 2 == 0, "id": id_}
                        for j, id_ in enumerate(ids)]
            call = InFlight("upsert", ids, list(zip(unit(vectors), metadata, strict=True)))
        try:
            if call.kind == "delete":
                client.delete(COLLECTION, call.ids)
            else:
                written = client.upsert(COLLECTION, ids=call.ids, vectors=vectors,
                                        metadata=metadata)
                assert written == len(call.ids)
        except ClipSearchError:
            if not killed.is_set():
                raise
            truth.interrupted(call)
            return calls
        truth.acknowledged(call.ids, call.new)
        recent.extend(call.ids)
        calls += 1


def recovery_mode(log: str) -> str:
    """How the server brought the collection's index back, from its start-up log.

    A rebuild is expected only before the first snapshot: snapshots are written atomically, so
    a kill during one must leave the previous one loadable.
    """
    found = re.search(rf"collection {COLLECTION}: \d+ items, (.+) in [\d.]+s", log)
    assert found, log
    for reason in re.findall(rf"collection {COLLECTION}: (.+); rebuilding the index", log):
        assert reason == "no snapshot yet", f"snapshot refused after a kill: {reason}"
    return found.group(1)


def start_server(checkpoint: Path, data: Path, round_: int, engine: Engine) -> ServerProcess:
    interval = SNAPSHOT_INTERVALS[round_ % len(SNAPSHOT_INTERVALS)]
    flags = ["--snapshot-interval-s", str(interval)] if interval else []
    return ServerProcess(checkpoint, data, *flags, *engine.args).start()


def kill_timer(proc: ServerProcess, delay: float, killed: threading.Event) -> threading.Timer:
    """A started timer that SIGKILLs the server after `delay` seconds."""

    def kill() -> None:
        killed.set()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGKILL)

    timer = threading.Timer(delay, kill)
    timer.start()
    return timer


@pytest.mark.timeout(600)  # about 21 server starts of ~5 s each, more on a busy machine
@pytest.mark.parametrize(("store", "rounds"), [("local", ROUNDS), ("milvus", 6)])
def test_acknowledged_writes_survive_repeated_sigkill(store: str, rounds: int,
                                                      tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    """On Milvus (fewer rounds: each start opens the Lite engine) the engine keeps what it
    acknowledged; on the local store the graph is recovered from snapshots and the store."""
    if store == "milvus":
        pytest.importorskip("pymilvus")
    engine = Engine(store)
    data = tmp_path / "data"
    truth = Truth()
    delays = np.random.default_rng(SEED).uniform(*KILL_AFTER_S, size=rounds)
    modes: list[str] = []
    recent: list[str] = []  # ids acknowledged in the last round
    calls = 0
    started = time.monotonic()
    for round_ in range(rounds):
        rng = np.random.default_rng([SEED, round_])  # this round's writes and checks
        proc = start_server(tiny_checkpoint, data, round_, engine)
        try:
            with Client(proc.address, timeout=20) as client:
                if round_ > 0 and engine.local_store:
                    modes.append(recovery_mode(proc.log()))
                    verify(client, truth, rng, recent)
                recent = []
                killed = threading.Event()
                timer = kill_timer(proc, float(delays[round_]), killed)
                try:
                    calls += write_until_killed(client, truth, rng, round_, killed, recent)
                finally:
                    timer.join()
            assert proc.wait() == -signal.SIGKILL
            assert "Traceback" not in proc.log(), proc.log()
        finally:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop(signal.SIGKILL)

    proc = start_server(tiny_checkpoint, data, rounds, engine)
    try:
        if engine.local_store:
            modes.append(recovery_mode(proc.log()))
        with Client(proc.address, timeout=20) as client:
            verify(client, truth, np.random.default_rng([SEED, rounds]), recent)
    finally:
        assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()

    present = len(truth.known_present())
    print(f"\n{rounds} kills, {calls} acknowledged calls, {len(truth.possible)} ids "
          f"({present} present) in {time.monotonic() - started:.1f}s; recovery: "
          + ", ".join(f"{m} x{modes.count(m)}" for m in sorted(set(modes))))
    assert not engine.local_store or any(m.startswith("loaded snapshot") for m in modes), modes
