"""Charts: drawn straight to files from a shell; in a notebook also shown under the cell."""
import matplotlib

from common.plumbing.cli import in_notebook

if not in_notebook():
    matplotlib.use("Agg")  # from a shell: no window needed
import matplotlib.pyplot as plt  # noqa: E402 (the lessons draw with it)


def save_chart(fig, path):
    """Save the chart (in a notebook, show it under the cell too), then close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if in_notebook():
        plt.show()
    plt.close(fig)
