"""``python -m medmm.tasks --config configs/tasks/<recipe>.yaml [key=value ...]``."""

import sys

from .head import main

if __name__ == "__main__":
    main(sys.argv[1:])
