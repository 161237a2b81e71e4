"""``fastpix2pix datasets``: list, download and combine paired datasets."""

from __future__ import annotations

import argparse

from fastpix2pix import data


def run(args: argparse.Namespace) -> int:
    if args.action == "download":
        print(f"dataset {args.dataset_name} in {data.download_dataset(args.dataset_name, args.root)}")
    elif args.action == "combine":
        counts = data.combine_ab(
            args.fold_A, args.fold_B, args.fold_AB, use_ab_suffix=args.use_AB, max_images=args.num_imgs,
            resize_b=args.resize_B is not None, method=args.resize_B or "bicubic",
        )  # fmt: skip
        print(
            f"wrote {', '.join(f'{n} {phase}' for phase, n in counts.items())} A|B images to {args.fold_AB}"
        )
    else:
        root = data.generate_synthetic_facades(args.root, args.n_train, args.n_test, args.size, args.seed)
        print(f"synthetic dataset ({args.n_train} train, {args.n_test} test, {args.size}px) in {root}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("datasets", help="download, combine or generate datasets")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    download = actions.add_parser("download", help="download an official pix2pix dataset")
    download.add_argument("dataset_name", help="facades, maps, edges2shoes, edges2handbags, night2day, ...")
    download.add_argument("--root", default="datasets", help="the dataset goes to ROOT/NAME")
    combine = actions.add_parser("combine", help="pair A and B images (by file name) into A|B images")
    combine.add_argument(
        "--fold_A", required=True, help="folder with phase subfolders (train, test, ...) of A"
    )
    combine.add_argument("--fold_B", required=True, help="folder with the same subfolders of B")
    combine.add_argument("--fold_AB", required=True, help="output folder")
    combine.add_argument("--use_AB", action="store_true", help="pair x_A.ext with x_B.ext, writing x.ext")
    combine.add_argument("--num_imgs", type=float, default=float("inf"), help="at most this many per phase")
    combine.add_argument(
        "--resize_B",
        choices=("bicubic", "bilinear", "nearest"),
        help="resize each B image to its A image's size with this filter (nearest for label maps) instead of "
        "stopping at the first size mismatch",
    )
    synthetic = actions.add_parser("synthetic", help="generate the procedural facades-like dataset")
    synthetic.add_argument("--root", default="datasets/synthetic", help="output folder (train/ and test/)")
    synthetic.add_argument("--n_train", type=int, default=400, help="number of training pairs")
    synthetic.add_argument("--n_test", type=int, default=100, help="number of test pairs")
    synthetic.add_argument("--size", type=int, default=256, help="side of A and B in pixels")
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same bytes)")
    parser.set_defaults(run=run)
