"""Client sub-commands of `neco` (also `python -m neco.client`); torch-free.

    neco features IMG --out f.npy [--pca pca.png]
    neco bank build SUPPORT --out BANK [--memory-size N] [--fp16] [--index flat|ivf|hnsw] [--shard i/n]
    neco bank merge OUT SHARD_BANK...
    neco bank append BANK SUPPORT
    neco bank info BANK
    neco bank novelty BANK [--dim D | --variance V] [--calibrate HELD_OUT_DIR]
    neco segment IMG --bank BANK [--out mask.png] [--overlay overlay.png] [--unknown [METHOD]]
    neco novelty IMG --bank BANK --out map.png [--method neco|knn]

Every command that talks to a server takes --url / --transport / --model-name / --size (the
flag names of `neco.cli.VOCABULARY`; the old --protocol / --model work for one release).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neco.atomic import make_parent
from neco.cli import deprecated_alias
from neco.client.bank import DEFAULT_IMAGE_SIZE
from neco.client.novelty import DEFAULT_ACCEPTANCE, DEFAULT_KNN_K, DEFAULT_METHOD, DEFAULT_VARIANCE, METHODS
from neco.client.size_policy import SIZE_MISMATCH_FLAG, shown
from neco.client.support import support_size
from neco.client.upsample import DEFAULT_UPSAMPLE, UPSAMPLE_METHODS
from neco.contract import DEFAULT_K, DEFAULT_MODEL_NAME, DEFAULT_TEMPERATURE
from neco.errors import InputError

Handler = Callable[[argparse.Namespace], int]
BUILD_SIZE_HELP = (
    f"shorter side N, or exact HxW (default: the support images' own shorter side, at most {DEFAULT_IMAGE_SIZE})"
)


def _aggregation(text: str) -> str | float:
    """`mean` or a quantile such as `0.9`."""
    if text == "mean":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"aggregation must be 'mean' or a quantile in [0, 1], got {text!r}") from None


def _size(text: str) -> int | tuple[int, int]:
    """`448` (shorter side) or `448x448` (exact height x width)."""
    try:
        if "x" in text:
            height, width = text.lower().split("x")
            return int(height), int(width)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None


def _server_options(
    parser: argparse.ArgumentParser, size_help: str = f"shorter side N, or exact HxW (default {DEFAULT_IMAGE_SIZE})"
) -> None:
    group = parser.add_argument_group("server")
    group.add_argument(
        "--url",
        default=None,
        help="host:port, a comma-separated list (round-robin with failover), or dns:///NAME:PORT for every "
        "address of NAME (default localhost:8001 for grpc, 8000 for http)",
    )
    transport = group.add_argument("--transport", choices=("grpc", "http"), default="grpc", help="transport")
    deprecated_alias(group, transport, "--protocol")
    deprecated_alias(
        group, group.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="Triton model name"), "--model"
    )
    group.add_argument("--size", type=_size, default=None, help=size_help)
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request, retries included")
    group.add_argument(
        "--retries", type=int, default=3, help="retries of a failed request on a retryable error (0: off)"
    )
    group.add_argument("--retry-backoff", type=float, default=0.1, help="first wait between retries, doubled up to 2 s")


def _size_options(parser: argparse.ArgumentParser) -> None:
    """Server options of a query command: the size is the bank's, another one only when asked for."""
    _server_options(
        parser, size_help="resize policy N or HxW (default: the bank's own; another needs " + SIZE_MISMATCH_FLAG + ")"
    )
    parser.add_argument(
        SIZE_MISMATCH_FLAG, action="store_true", help="query at --size although the bank was built at another size"
    )


def _client(args: argparse.Namespace) -> Any:
    from neco.client.transport import RetryPolicy
    from neco.client.triton import NecoClient

    size = args.size if args.size is not None else DEFAULT_IMAGE_SIZE
    retry = RetryPolicy(
        attempts=args.retries + 1, initial_backoff_s=args.retry_backoff, max_backoff_s=max(2.0, args.retry_backoff)
    )
    return NecoClient(
        args.url, protocol=args.transport, model=args.model_name, size=size, timeout_s=args.timeout, retry=retry
    )


def _features(args: argparse.Namespace) -> int:
    import numpy as np

    from neco.client.render import features_to_rgb

    with _client(args) as client:
        dense = client.features(args.image)
    make_parent(args.out)
    np.save(args.out, dense.features, allow_pickle=False)
    if args.pca is not None:
        features_to_rgb(dense.features, size=dense.image.original_size).save(args.pca)
    sy, sx = dense.image.scale
    print(
        f"{args.image}: {dense.image.original_size[0]}x{dense.image.original_size[1]} -> "
        f"{dense.image.size[0]}x{dense.image.size[1]}, features {dense.features.shape} -> {args.out}; "
        f"patch (i, j) covers original rows [{dense.image.patch_size * sy:.2f}*i, +{dense.image.patch_size * sy:.2f}) "
        f"and cols [{dense.image.patch_size * sx:.2f}*j, +{dense.image.patch_size * sx:.2f})"
    )
    return 0


def _class_names(path: Path | None) -> list[str] | None:
    from neco.layout import read_class_names

    return None if path is None else read_class_names(path)


def _bank_build(args: argparse.Namespace) -> int:
    from neco.client.bank import BuildOptions, IndexSpec, MemoryBank
    from neco.client.bank_io import check_writable
    from neco.client.support import parse_shard

    options = BuildOptions(
        class_names=_class_names(args.classes),
        num_classes=args.num_classes,
        dtype="float16" if args.fp16 else "float32",
        index=IndexSpec(kind=args.index),
        memory_size=args.memory_size,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
        shard=parse_shard(args.shard),
    )
    check_writable(args.out)  # fail before minutes of feature extraction, not after
    make_parent(args.out)
    size = args.size if args.size is not None else support_size(args.support)
    with _client(args) as client:
        bank = MemoryBank.build(client, args.support, options.model_copy(update={"image_size": size}))
    bank.save(args.out)
    shard = f" (shard {args.shard})" if args.shard != "0/1" else ""
    print(f"{bank!r}, input size {shown(bank.image_size)} -> {args.out}{shard}")
    return 0


def _bank_merge(args: argparse.Namespace) -> int:
    from neco.client.bank import MemoryBank
    from neco.client.bank_io import check_writable

    check_writable(args.out)
    make_parent(args.out)
    bank = MemoryBank.merge([MemoryBank.load(path) for path in args.shards])
    bank.save(args.out)
    print(f"{bank!r} <- {len(args.shards)} shards -> {args.out}")
    return 0


def _bank_append(args: argparse.Namespace) -> int:
    from neco.client.bank import MemoryBank

    with _client(args) as client, MemoryBank.updating(args.bank, contract=client.contract) as bank:
        options = {"memory_size": args.memory_size, "batch_size": args.batch_size, "seed": args.seed}
        bank.add(client, args.support, progress=True, **options)
    print(f"{bank!r} -> {args.bank}")
    return 0


def _bank_info(args: argparse.Namespace) -> int:
    from neco.client.bank import MemoryBank

    bank = MemoryBank.load(args.bank, verify=not args.no_verify)
    print(repr(bank))
    print(f"contract: {bank.contract.model_dump_json()}")
    print(f"classes: {bank.class_names}")
    print(f"image size: {bank.image_size}, array bytes: {bank.nbytes}")
    print(f"novelty: {bank.novelty!r}" if bank.novelty is not None else "novelty: not fitted (`neco bank novelty`)")
    return 0


def _held_out_images(folder: Path) -> list[Path]:
    """Image files of `folder/images/` if it exists, else of `folder` itself."""
    from neco.layout import IMAGE_SUFFIXES, IMAGES_DIR

    source = folder / IMAGES_DIR if (folder / IMAGES_DIR).is_dir() else folder
    if not source.is_dir():
        raise ValueError(f"held-out image folder {str(folder)!r} does not exist")
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{str(source)!r} holds no images to calibrate on")
    return images


def _bank_novelty(args: argparse.Namespace) -> int:
    from neco.client.bank import MemoryBank
    from neco.client.novelty import NoveltySpec
    from neco.client.retrieval import calibrate_novelty

    with MemoryBank.updating(args.bank) as bank:
        bank.fit_novelty(NoveltySpec(dim=args.dim, variance=args.variance))
        if args.calibrate is not None:
            with _client(args) as client:
                calibrate_novelty(
                    client,
                    _held_out_images(args.calibrate),
                    bank,
                    aggregation=args.aggregate,
                    acceptance=args.acceptance,
                    k=args.k,
                )
    print(f"{bank.novelty!r} -> {args.bank}")
    for name, calibration in bank.novelty.calibrations.items():
        print(
            f"  {name}: image threshold {calibration.image_threshold:.4f}, patch threshold "
            f"{calibration.patch_threshold:.4f} ({calibration.acceptance:.0%} of {calibration.num_images} images)"
        )
    return 0


def _segment(args: argparse.Namespace) -> int:
    import numpy as np

    if args.out is None and args.overlay is None:
        raise InputError("neco segment writes --out (the mask), --overlay (the picture) or both: give one")
    with _client(args) as client:
        result = client.segment(
            args.image, args.bank, k=args.k, temperature=args.temperature, size=args.size, unknown=args.unknown,
            allow_size_mismatch=args.allow_size_mismatch, upsample=args.upsample,
        )  # fmt: skip
    if args.out is not None:
        make_parent(args.out)
        result.mask_image().save(args.out)
    if args.overlay is not None:
        make_parent(args.overlay)
        result.overlay().save(args.overlay)  # the query segment() decoded, not a second read
    labels, counts = np.unique(result.mask, return_counts=True)
    shares = ", ".join(f"{result.class_names[lab]} {cnt / result.mask.size:.1%}" for lab, cnt in zip(labels, counts))
    height, width = result.input_size
    written = " and ".join(str(path) for path in (args.out, args.overlay) if path is not None)
    print(
        f"{args.image}: mask {result.mask.shape[0]}x{result.mask.shape[1]} -> {written} ({shares}); "
        f"encoder input {height}x{width} (size {shown(args.size) if args.size is not None else 'of the bank'}); "
        f"{result.upsample} upsampling"
    )
    return 0


def _novelty(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.novelty(
            args.image, args.bank, method=args.method, aggregation=args.aggregate, k=args.k, size=args.size,
            allow_size_mismatch=args.allow_size_mismatch,
        )  # fmt: skip
    make_parent(args.out)
    result.overlay(args.image, alpha=args.alpha).save(args.out)
    verdict = "uncalibrated" if result.is_novel is None else ("NOVEL" if result.is_novel else "in-distribution")
    threshold = "" if result.threshold is None else f" (threshold {result.threshold:.4f})"
    print(
        f"{args.image}: {result.method} novelty {result.score:.4f} [{result.aggregation}]{threshold}: {verdict}; "
        f"map {result.scores.shape[0]}x{result.scores.shape[1]} -> {args.out}"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add `features`, `bank`, `segment` and `novelty` to the `neco` command."""
    features = subparsers.add_parser("features", help="dense patch features of an image (.npy)")
    features.add_argument("image", help="image file")
    features.add_argument("--out", type=Path, required=True, help="output .npy, (h, w, C) float32")
    features.add_argument("--pca", type=Path, default=None, help="also write a PCA->RGB picture (PNG)")
    _server_options(features)
    features.set_defaults(handler=_features)

    bank = subparsers.add_parser("bank", help="build / extend / inspect a memory bank")
    actions = bank.add_subparsers(dest="bank_command", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build a bank from a folder with images/ and masks/")
    build.add_argument("support", type=Path, help="folder with images/ and masks/ (optional classes.json)")
    build.add_argument("--out", type=Path, required=True, help="bank folder to write")
    build.add_argument("--classes", type=Path, default=None, help="JSON list of class names")
    build.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat", help="faiss index of the bank")
    build.add_argument("--fp16", action="store_true", help="store features and labels as float16")
    build.add_argument("--shard", default="0/1", help="build only shard i/n (images i, i+n, ...); join with merge")
    build.add_argument("--num-classes", type=int, default=None, help="K without a class list (labels >= K fail)")
    for sub in (build, actions.add_parser("append", help="add a support folder's patches to a saved bank")):
        sub.add_argument("--memory-size", type=int, default=None, help="patch budget (rare classes favoured)")
        sub.add_argument("--batch-size", type=int, default=8)
        sub.add_argument("--seed", type=int, default=0)
        _server_options(sub, **({"size_help": BUILD_SIZE_HELP} if sub is build else {}))
    build.set_defaults(handler=_bank_build)
    append = actions.choices["append"]
    append.add_argument("bank", type=Path, help="saved bank folder")
    append.add_argument("support", type=Path, help="folder with images/ and masks/")
    append.set_defaults(handler=_bank_append)
    merge = actions.add_parser("merge", help="join banks built with --shard i/n into one (no server)")
    merge.add_argument("out", type=Path, help="bank folder to write")
    merge.add_argument("shards", type=Path, nargs="+", help="shard bank folders")
    merge.set_defaults(handler=_bank_merge)
    info = actions.add_parser("info", help="print a saved bank's manifest summary (no server)")
    info.add_argument("bank", type=Path)
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    info.set_defaults(handler=_bank_info)
    fit = actions.add_parser("novelty", help="fit the NECO subspace of a saved bank (and calibrate thresholds)")
    fit.add_argument("bank", type=Path, help="saved bank folder (rewritten with the subspace)")
    fit.add_argument("--dim", type=int, default=None, help="principal components d (default: by --variance)")
    fit.add_argument("--variance", type=float, default=DEFAULT_VARIANCE, help="explained-variance threshold")
    fit.add_argument("--calibrate", type=Path, default=None, help="held-out in-distribution images (needs a server)")
    fit.add_argument("--acceptance", type=float, default=DEFAULT_ACCEPTANCE, help="share of them to accept")
    fit.add_argument("--aggregate", type=_aggregation, default="mean", help="image score: mean or a quantile")
    fit.add_argument("--k", type=int, default=DEFAULT_KNN_K, help="neighbours of the k-NN baseline")
    _server_options(fit)
    fit.set_defaults(handler=_bank_novelty)

    seg = subparsers.add_parser("segment", help="segment an image by k-NN label transfer from a bank")
    seg.add_argument("image", help="image file")
    seg.add_argument("--bank", required=True, help="saved bank folder, or a support folder (built on the fly)")
    seg.add_argument("--out", type=Path, default=None, help="mask PNG (pixel value = class index)")
    seg.add_argument("--overlay", type=Path, default=None, help="colour overlay PNG with legend (one of the two)")
    seg.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours per patch")
    seg.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature")
    seg.add_argument(
        "--unknown",
        nargs="?",
        const=True,
        default=False,
        choices=METHODS,
        help=f"label novel pixels 'unknown' (the bank's calibrated threshold; METHOD: {' or '.join(METHODS)}, "
        f"default {DEFAULT_METHOD})",
    )
    seg.add_argument(
        "--upsample",
        choices=UPSAMPLE_METHODS,
        default=DEFAULT_UPSAMPLE,
        help="patch scores to pixels: guided by the image's edges, or bilinear (the Hummingbird protocol's)",
    )
    _size_options(seg)
    seg.set_defaults(handler=_segment)

    nov = subparsers.add_parser("novelty", help="novelty heat map and decision of an image against a bank")
    nov.add_argument("image", help="image file")
    nov.add_argument("--bank", required=True, help="saved bank folder, or a support folder (built on the fly)")
    nov.add_argument("--out", type=Path, required=True, help="heat-map overlay PNG with a colour bar")
    nov.add_argument(
        "--method", choices=METHODS, default=DEFAULT_METHOD, help="the k-NN distance (measures best) or NECO"
    )
    nov.add_argument("--aggregate", type=_aggregation, default=None, help="mean or a quantile (default: calibrated)")
    nov.add_argument("--k", type=int, default=DEFAULT_KNN_K, help="neighbours of the k-NN baseline")
    nov.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity")
    _size_options(nov)
    nov.set_defaults(handler=_novelty)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neco.client`: the client's commands without importing the other stages."""
    from neco.cli import run

    parser = argparse.ArgumentParser(prog="python -m neco.client", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser, argv)
