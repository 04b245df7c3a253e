"""cluster/train.py `load_checkpoint`: a Ray Train checkpoint read back from the store never runs pickled code."""

from pathlib import Path

import pytest
import torch

from cluster.train import load_checkpoint
from schemas.errors import ArtifactError

MARK = Path("/tmp/zooter-checkpoint-payload-ran")


class Payload:
    """What someone who can write the store during a fit could plant: unpickling it would run code."""

    def __reduce__(self):
        return (MARK.write_text, ("ran",))


def test_a_real_checkpoint_loads_and_a_planted_one_runs_nothing(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
               "config": {"lr": 1e-3, "loss": "kl", "prefix": "", "tag_temperature": None}, "experts": ["a", "b"],
               "labels": "abc123"}
    torch.save(payload, tmp_path / "checkpoint.pt")
    back = load_checkpoint(tmp_path / "checkpoint.pt")  # what train_loop saves loads with weights_only=True
    assert back["epoch"] == 3 and back["experts"] == ["a", "b"] and torch.equal(back["model"]["weight"],
                                                                                model.state_dict()["weight"])
    MARK.unlink(missing_ok=True)
    torch.save({**payload, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match=r"evil\.pt: not a router checkpoint this code wrote"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not MARK.exists()  # the payload's code never ran
