"""DVC stage `check`: every value of params.yaml validated before any stage touches its outputs.

    python stages/check.py data/params.ok

DVC deletes a stage's outputs before it runs the stage's command, so a stage that
refused a bad parameter only after DVC started it would lose its previous outputs.
This stage depends on all of params.yaml and every other stage depends on its output,
so a bad value stops `dvc repro` here, with one `error:` line, before any other stage
starts. The output's content is fixed: a valid change of parameters re-runs this
stage but, by itself, none of the stages after it.
"""

import argparse
from pathlib import Path

from mdser.errors import run_stage
from mdser.params import load_params

CONTENT = "params.yaml: every value valid (checked by stages/check.py)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    load_params()  # a UserError names the key, the value and what is allowed

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(CONTENT)
    tmp.replace(args.out)
    print(f"params.yaml: valid -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
