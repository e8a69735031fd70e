r"""Mean +- std of SID quality reports over several runs (README table).

  python experiments/sids_table.py runs/sids_0 runs/sids_1 runs/sids_2

Each argument is a workdir of experiments/build_sids.py (seeds of one
config); prints a markdown table, one column per quantizer.
"""

import sys

import numpy as np

from taiji_jax.train import metric_writer

ROWS = (
    ("collision rate before resolution",
     lambda r: r["collisions_before"]["collision_rate"], "{:.4f}"),
    ("largest collision group", lambda r: r["collisions_before"]["max_group"],
     "{:.1f}"),
    ("collision rate after", lambda r: r["collision_rate_after"], "{:.4f}"),
    ("relative reconstruction error", lambda r: r["reconstruction_error"],
     "{:.3f}"),
    ("L1 / L2 / L3 normalised entropy",
     lambda r: [u["normalised_entropy"] for u in r["usage"][:3]], "{:.3f}"),
    ("L1 / L2 / L3 utilisation",
     lambda r: [u["utilisation"] for u in r["usage"][:3]], "{:.3f}"),
    ("L1 genre purity", lambda r: r["coherence"]["purity"], "{:.3f}"),
    ("  shuffled-cluster baseline", lambda r: r["coherence"]["random_purity"],
     "{:.3f}"),
    ("build seconds", lambda r: r["seconds"], "{:.1f}"),
)


def _cell(values, fmt):
  v = np.asarray(values, float)
  if v.ndim == 2:
    return " / ".join(_cell(v[:, i], fmt) for i in range(v.shape[1]))
  return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"


def main(workdirs):
  # The build seconds are in each run's timing.json.
  results = [metric_writer.read_results(w, timing=True) for w in workdirs]
  names = list(results[0]["reports"])
  print(f"| ({len(results)} runs) | " + " | ".join(names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for label, get, fmt in ROWS:
    cells = [_cell([get(r["reports"][n]) for r in results], fmt) for n in names]
    print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
