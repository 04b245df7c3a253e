"""publish: the champion/challenger rule (decided on validation, never on test), the champion record it writes,
its lease, old records, and corrupted records."""

import threading
import time

import pyarrow as pa
import pytest

from schemas.artifacts import CHAMPION_PATH, LABELS, labels_path
from schemas.errors import ArtifactError
from schemas.evaluation import EvalReport, StrategyRow, Validation, read_champion
from schemas.leases import Leases
from schemas.store import Store
from tasks.publish import decide, publish


def report(router: str, val: float | None, test: float | None = 0.0, labels: str = "l1", seed: int = 0
           ) -> EvalReport:
    """A report whose router has reward `val` on its validation slice and `test` on the test split."""
    return EvalReport(evaluation=f"e-{router}", labels=labels, router=router, experts=["a", "b"], test_queries=3,
                      best_single="a", rows=[StrategyRow(strategy="router", reward=test, expert_calls=1, rm_calls=0)],
                      router_share={"a": 1.0, "b": 0.0}, validation=Validation(queries=5, seed=seed, reward=val))


@pytest.mark.parametrize(("challenger", "champion", "has", "want"), [
    (0.1, None, False, ("promoted", "no champion yet")),
    (None, None, False, ("promoted", "no champion yet")),
    (0.1, None, True, ("promoted", "the champion cannot be measured on this validation slice")),
    (None, 0.5, True, ("kept", "the challenger has no reward on this validation slice")),
    (0.5, 0.5, True, ("promoted", "the challenger is not worse than the champion on validation")),
    (0.6, 0.5, True, ("promoted", "the challenger is not worse than the champion on validation")),
    (0.4, 0.5, True, ("kept", "the challenger is worse than the champion on validation")),
])
def test_decide(challenger, champion, has, want):
    assert decide(challenger, champion, has) == want


def _publish(store, rep: EvalReport, run_id: str = "run"):
    return publish(store, rep.router, rep.evaluation, rep, run_id)


def test_champion_record_follows_the_rule_on_the_same_labels(tmp_path):
    store = Store(str(tmp_path))
    assert read_champion(store) is None
    d = _publish(store, report("r1", 1.0, test=0.7), "run1")
    assert (d.decision, d.champion, d.compared_on, d.split, d.challenger_test_reward) == \
        ("promoted", None, None, "validation", 0.7)
    champ = read_champion(store)
    assert (champ.router, champ.evaluation, champ.router_fp, champ.evaluation_fp) == \
        ("routers/r1", "evaluations/e-r1", "r1", "e-r1")
    assert (champ.labels, champ.experts, champ.reward, champ.val_reward, champ.val_seed, champ.run_id,
            champ.replaced) == ("l1", ["a", "b"], 0.7, 1.0, 0, "run1", None)

    d = _publish(store, report("r1", 1.0))
    assert (d.decision, d.reason) == ("kept", "the champion is this run's router")
    d = _publish(store, report("r2", 0.5))
    assert (d.decision, d.champion, d.champion_reward, d.compared_on, d.queries) == ("kept", "r1", 1.0, "l1", 5)
    assert read_champion(store).router_fp == "r1"
    d = _publish(store, report("r3", 1.0), "run3")  # a tie promotes the challenger
    assert (d.decision, d.challenger, d.challenger_reward) == ("promoted", "r3", 1.0)
    assert (read_champion(store).router_fp, read_champion(store).replaced) == ("r3", "r1")


def _heartbeats(owner: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"leases-{owner}"]


def test_publish_uses_the_run_leases_or_closes_its_own(tmp_path):
    store = Store(str(tmp_path))
    with Leases(store, owner="run-a") as leases:
        _ = publish(store, "r1", "e1", report("r1", 1.0), "run-a", leases)
        assert not leases.held and not store.exists(f"leases/{CHAMPION_PATH}.lease")
        assert _heartbeats("run-a")  # still the run's: publish does not close it
    publish(store, "r2", "e2", report("r2", 2.0), "run-b")
    deadline = time.monotonic() + 5
    while _heartbeats("run-b") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _heartbeats("run-b")  # its own leases were closed: no heartbeat thread leaks
    assert read_champion(store).router_fp == "r2"


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"router": "routers/r1"}'])
def test_a_corrupted_champion_record_is_one_artifact_error(tmp_path, body):
    store = Store(str(tmp_path))
    store.write_bytes(CHAMPION_PATH, body)
    with pytest.raises(ArtifactError, match=r"champion.json: corrupted champion record \(.+\); delete it"):
        read_champion(store)
    with pytest.raises(ArtifactError, match="corrupted champion record"):
        _publish(store, report("r1", 1.0))
    assert store.read_bytes(CHAMPION_PATH) == body  # never overwritten


def test_a_router_better_on_test_but_worse_on_validation_is_not_promoted(tmp_path):
    store = Store(str(tmp_path))
    _publish(store, report("r1", val=0.8, test=0.5))
    d = _publish(store, report("r2", val=0.7, test=0.9))  # test would promote it; validation decides
    assert (d.decision, d.split, d.challenger_reward, d.champion_reward, d.challenger_test_reward) == \
        ("kept", "validation", 0.7, 0.8, 0.9)
    assert read_champion(store).router_fp == "r1"
    d = _publish(store, report("r3", val=0.9, test=0.1))  # worse on test, better on validation: promoted
    assert (d.decision, read_champion(store).router_fp, read_champion(store).reward) == ("promoted", "r3", 0.1)


def test_a_champion_record_from_before_validation_promotion_still_loads(tmp_path):
    store = Store(str(tmp_path))
    store.write_json(CHAMPION_PATH, {"router": "routers/r0", "evaluation": "evaluations/e0", "labels": "l0",
                                     "experts": ["a", "b"], "reward": 0.6, "run_id": "old",
                                     "published": "2026-01-01T00:00:00+00:00", "replaced": None})
    champ = read_champion(store)
    assert (champ.router_fp, champ.reward, champ.val_reward, champ.val_seed) == ("r0", 0.6, None, None)


def test_a_champion_whose_targets_saw_the_validation_queries_is_not_measured_on_them(tmp_path):
    store = Store(str(tmp_path))
    n = 40  # every query in the train split: the challenger's validation slice lies inside the champion's
    store.write_table(labels_path("l1"), pa.table({
        "query_id": [f"q{i}" for i in range(n)], "text": ["t"] * n, "split": ["train"] * n, "tags": [[]] * n,
        "rewards": [[1.0, 0.0]] * n, "soft": [[0.7, 0.3]] * n, "target": [[0.7, 0.3]] * n}, schema=LABELS),
        LABELS, {"experts": ["a", "b"]})
    _publish(store, report("r1", val=0.9))
    assert read_champion(store).val_unseen  # a record written now: its router's prior came from its fitted rows
    d = _publish(store, report("r2", val=0.5))  # same labels, same slice: compared on the record's number
    assert (d.decision, d.champion_reward) == ("kept", 0.9)
    record = store.read_json(CHAMPION_PATH)
    store.write_json(CHAMPION_PATH, {k: v for k, v in record.items() if k != "val_unseen"})  # written before
    assert not read_champion(store).val_unseen
    d = _publish(store, report("r2", val=0.5))  # its 0.9 was measured on queries whose rewards shaped its targets
    assert (d.decision, d.reason, d.champion_reward, d.queries) == \
        ("promoted", "the champion cannot be measured on this validation slice", None, 0)
    assert read_champion(store).router_fp == "r2" and read_champion(store).val_unseen
