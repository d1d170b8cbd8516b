"""Adversarially train the reference CNN on MNIST (same options as `tfadv train mnist`).

    python training/mnist_adversarial.py --method pgd --epochs 20 --out runs/pgd
"""

import sys

from tfadv.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "mnist", *sys.argv[1:]]))
