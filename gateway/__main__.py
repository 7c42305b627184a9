"""python -m gateway [flags]: run the gateway until SIGTERM."""

import sys

from twostage.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "gateway", *sys.argv[1:]]))
