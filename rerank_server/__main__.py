"""python -m rerank_server [flags]: run the rerank server until SIGTERM."""

import sys

from twostage.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "rerank", *sys.argv[1:]]))
