"""Run a trained medmm model: see ``python infer.py --help``."""

from medmm.inference.__main__ import main

if __name__ == "__main__":
    main()
