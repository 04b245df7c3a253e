"""`zooter inspect --plot`: the PNG of a label summary (tag x expert heatmap, win-rate bars)."""

import matplotlib.image as mpimg
import numpy as np

from tasks.plots import labels_figure, plot_labels

SUMMARY = {
    "rows": 12,
    "experts": [{"expert": "a", "mean_reward": -1.0, "win_rate": 0.75},
                {"expert": "b", "mean_reward": -2.0, "win_rate": 0.25}],
    "tag_target": [{"tag": "coding", "n": 3, "a": 0.6, "b": 0.4}, {"tag": "math", "n": 3, "a": 0.9, "b": 0.1},
                   {"tag": "trivia", "n": 3, "a": None, "b": None}],
}


def test_the_figure_plots_the_summarys_values():
    import matplotlib.pyplot as plt

    fig = labels_figure(SUMMARY, title="tiny")
    heat, bars = fig.axes[0], fig.axes[1]
    grid = np.ma.filled(heat.images[0].get_array().astype(float), np.nan)
    want = [[0.6, 0.4], [0.9, 0.1], [np.nan, np.nan]]  # tags in order; trivia has no target: blank
    np.testing.assert_allclose(grid, want)
    assert [t.get_text() for t in heat.texts] == ["0.60", "0.40", "0.90", "0.10"]  # each cell's value, written
    assert [t.get_text() for t in heat.get_yticklabels()] == ["coding (n=3)", "math (n=3)", "trivia (n=3)"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["a", "b"]
    assert [p.get_height() for p in bars.patches] == [0.75, 0.25]  # the win rates
    assert "12 queries" in bars.get_title()
    plt.close(fig)


def test_plot_labels_writes_a_png(tmp_path):
    out = plot_labels(SUMMARY, tmp_path / "sub" / "labels.png", title="tiny")
    img = mpimg.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400

