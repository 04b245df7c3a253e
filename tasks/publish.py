"""publish: make a router the store's champion (`champion.json`), the one `zooter route` uses."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.artifacts import CHAMPION_PATH, evaluation_dir, router_dir
from schemas.store import Store


def publish(store: Store, router_fp: str, eval_fp: str, report: dict, run_id: str) -> dict:
    router_row = next(r for r in report["rows"] if r["strategy"] == "router")
    champion = {"router": router_dir(router_fp), "evaluation": evaluation_dir(eval_fp),
                "labels": report["labels"], "experts": report["experts"], "reward": router_row["reward"],
                "run_id": run_id, "published": datetime.now(UTC).isoformat()}
    store.write_json(CHAMPION_PATH, champion)
    return champion
