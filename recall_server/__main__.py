"""python -m recall_server [flags]: run the recall server until SIGTERM."""

import sys

from twostage.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "recall", *sys.argv[1:]]))
