"""Cost of a training micro-step vs prompt length, completion length and batch size, padded path
against the fast path; writes a JSON file and the plot in docs/. Same as ``mmpo bench scaling``."""

import sys

from mmpo.bench import main

if __name__ == "__main__":
    sys.exit(main(["scaling", *sys.argv[1:]]))
