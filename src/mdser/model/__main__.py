"""Print the layer summary and parameter count of ablation rows.

    python -m mdser.model --filters 128 --classes 4 mdcnn-ff-spp-att-arcface
"""

import argparse

from mdser.errors import run_stage
from mdser.model import build_model, compact_summary
from mdser.params import load_params, row_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", nargs="*", help="ablation rows (default: all in params.yaml)")
    parser.add_argument("--filters", type=int, help="override model.filters (paper: 128)")
    parser.add_argument("--classes", type=int, default=4, help="4 for IEMOCAP, 7 for EMODB")
    args = parser.parse_args()
    params = load_params()
    for row in args.rows or list(params["ablation"]["rows"]):
        model_params = row_model(params, row)
        if args.filters:
            model_params["filters"] = args.filters
        model = build_model(model_params, args.classes, n_mels=params["features"]["n_mels"])
        print(f"{row} ({model_params['filters']} filters, {args.classes} classes): "
              f"{model.count_params():,} parameters")
        print("\n".join(compact_summary(model)) + "\n")


if __name__ == "__main__":
    run_stage(main)
