"""`zooter inspect --plot`: the PNG of a label summary (tag x expert heatmap, win-rate bars)."""

import matplotlib.image as mpimg

from tasks.plots import plot_labels

SUMMARY = {
    "rows": 12,
    "experts": [{"expert": "a", "mean_reward": -1.0, "win_rate": 0.75},
                {"expert": "b", "mean_reward": -2.0, "win_rate": 0.25}],
    "tag_target": [{"tag": "coding", "n": 3, "a": 0.6, "b": 0.4}, {"tag": "math", "n": 3, "a": 0.9, "b": 0.1},
                   {"tag": "trivia", "n": 3, "a": None, "b": None}],
}


def test_plot_labels_writes_a_png(tmp_path):
    out = plot_labels(SUMMARY, tmp_path / "sub" / "labels.png", title="tiny")
    img = mpimg.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # something was drawn

