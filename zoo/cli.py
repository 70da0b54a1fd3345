"""``fusion-zoo predict | zoo list | zoo info | export | convert | serve | push`` (dispatched by ``recipes.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusion_errors import FusionZooError, InputError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the zoo commands (the first argument is the command)."""
    parser = argparse.ArgumentParser(prog="fusion-zoo", description="Use, inspect, export and convert fused models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict from raw inputs with a saved or zoo model")
    p.add_argument("--model", required=True, help="zoo name, model folder or hf-hub:org/name")
    p.add_argument("--text", action="append", help="a text input (repeat for several samples)")
    p.add_argument("--image", action="append", help="an image file (repeat for several samples)")
    p.add_argument("--audio", action="append", help="an audio file (repeat for several samples)")
    p.add_argument("--table", help="a CSV/TSV/JSON(L)/parquet table, or a folder of image/audio files: predict every "
                                   "row (read as `fit` reads one; relative file paths from its folder) and write a "
                                   "CSV (--output)")
    p.add_argument("--output", default="predictions.csv",
                   help="with --table: the CSV to write, the table's columns + prediction, probabilities, error")
    p.add_argument("--columns", help="with --table: modality -> column where the names differ, as JSON, e.g. "
                                     "'{\"text\": \"question\"}'")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per sample")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--no-explain", action="store_true", help="skip the per-modality contribution table")
    p.add_argument("--allow-external-paths", action="store_true",
                   help="let the model's config.json reference files outside its folder (only for trusted models)")
    p.add_argument("--no-fold", action="store_true",
                   help="run the image encoder as loaded (default: BatchNorm folded, channels-last; same outputs "
                        "within 1e-4)")
    p.add_argument("--online", action="store_true",
                   help="let encoders the model names download from the Hugging Face Hub (default: offline)")

    z = sub.add_parser("zoo", help="list and describe the pretrained fused models")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="the pretrained models: data, modalities, stage, head, test accuracy")
    zl.add_argument("pattern", nargs="?", help="shell pattern, e.g. '*-late-*'")
    zl.add_argument("--names", action="store_true", help="print only the names, one per line (for scripts)")
    zi = zsub.add_parser("info", help="card and metrics of one model")
    zi.add_argument("name")
    zi.add_argument("--json", action="store_true", help="print config, encoders and metrics as JSON")
    zv = zsub.add_parser("verify", help="re-measure a model's card test accuracy from its data (when present here)")
    zv.add_argument("names", nargs="*", help="zoo names or model folders (default: every shipped model)")
    zv.add_argument("--limit", type=int, help="only the first N test rows (a quick check; never 'matches')")

    e = sub.add_parser("export", help="export a fused model to ONNX or TorchScript")
    e.add_argument("name", help="zoo name or model folder")
    e.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    e.add_argument("--output", required=True, help="file to write (a .preprocessing.json sidecar goes next to it)")
    e.add_argument("--verify", action="store_true",
                   help="run the file at another batch size and length than traced; print the max abs diff vs eager")
    e.add_argument("--no-fold", action="store_true",
                   help="export the image encoder as loaded (default: BatchNorm folded, channels-last)")

    h = sub.add_parser("push", help="upload a fused model to the Hugging Face Hub")
    h.add_argument("model", help="zoo name, model folder or hf-hub:org/name")
    h.add_argument("repo_id", help="the Hub repo, org/name (created if it does not exist)")
    h.add_argument("--private", action="store_true", help="create the repo as private")
    h.add_argument("--token", help="a write token (default: huggingface-cli login's or HF_TOKEN)")
    h.add_argument("--dry-run", metavar="DIR", help="upload nothing: write the exact folder that would be uploaded")

    c = sub.add_parser("convert", help="Lightning .ckpt -> model folder, or model folder -> .ckpt")
    c.add_argument("source", help="a .ckpt file or a model folder")
    c.add_argument("--output", required=True)

    from .serve import add_arguments as add_serve_arguments  # no web imports until the command runs

    add_serve_arguments(sub.add_parser("serve", help="serve a model over HTTP: API + web page (docs/serve.md)",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def _predict(args: argparse.Namespace) -> int:
    from .model import FusionModel  # lazy: keeps `fusion-zoo --help` fast
    from .predict import explain_table

    if args.table:
        if args.text or args.image or args.audio:
            raise InputError("give either --table or --text/--image/--audio inputs, not both.")
        if args.table_predictor is None:
            raise InputError("--table reads tables with the recipes package: run it as `fusion-zoo predict`.")
        try:
            columns = json.loads(args.columns) if args.columns else None
        except json.JSONDecodeError as e:
            raise InputError(f"--columns is not JSON ({e}); write it as '{{\"text\": \"question\"}}'.") from e
        if columns is not None and not (isinstance(columns, dict)
                                        and all(isinstance(v, str) for v in columns.values())):
            raise InputError("--columns must map modalities to column names, e.g. '{\"text\": \"question\"}'.")
        model = FusionModel.from_pretrained(args.model, allow_external_paths=args.allow_external_paths,
                                            online=args.online)
        args.table_predictor(model, args.table, args.output, columns=columns, batch_size=args.batch_size,
                             fold=not args.no_fold)
        return 0
    if not (args.text or args.image or args.audio):
        raise InputError("give at least one input: --text '...', --image PATH or --audio PATH (or --table FILE).")
    model = FusionModel.from_pretrained(args.model, allow_external_paths=args.allow_external_paths,
                                            online=args.online)
    rows = model.predict(text=args.text, image=args.image, audio=args.audio, explain=not args.no_explain,
                         fold=not args.no_fold, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for i, row in enumerate(rows):
        if "values" in row:
            print(f"[{i}] " + ", ".join(f"{k}={v:.4g}" for k, v in row["values"].items()))
            if "explain" in row:
                print("\n".join("    " + line for line in explain_table(row["explain"], model.modalities)))
            continue
        top = sorted(row["probs"].items(), key=lambda kv: -kv[1])[: max(1, args.top)]
        head = row["label"] if "label" in row else ",".join(row["labels"]) or "(none)"
        print(f"[{i}] {head}  (" + ", ".join(f"{k}: {p:.3f}" for k, p in top) + ")")
        if "explain" in row:
            print("\n".join("    " + line for line in explain_table(row["explain"], model.modalities)))
    if rows and "explain" in rows[0]:
        print("contrib: drop in the predicted class's probability when the modality is left out (learned missing "
              "embedding); share: |contrib| / sum |contrib|")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from .registry import info, list_pretrained, summary

    if args.zoo_command == "verify":
        return _verify(args)
    if args.zoo_command == "list":
        names = list_pretrained(args.pattern)
        if not names:
            print("no pretrained models" + (f" match {args.pattern!r}" if args.pattern else " are shipped"))
        elif args.names:
            print("\n".join(names))
        else:
            _print_table([summary(n) for n in names])
        return 0
    data: dict[str, Any] = info(args.name)
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k != "card"}, indent=2, default=str))
    else:
        print(data.get("card") or json.dumps(data, indent=2, default=str))
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    """``zoo list``'s table: one model a row, the card's fused test accuracy last."""
    cols = ["name", "data", "modalities", "stage", "head", "test_accuracy"]
    cells = [["-" if r[c] is None else f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    header = ["name", "data", "modalities", "stage", "head", "test acc"]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=False)]
    for line in [header, *cells]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


def _verify(args: argparse.Namespace) -> int:
    """Print one line per model: its card's test accuracy, the re-measured one, and whether they match; exit 1 on
    a mismatch (a model whose data is not here is skipped, and says why)."""
    from .registry import list_pretrained

    if args.verifier is None:
        raise InputError("zoo verify reads datasets with the recipes package: run it as `fusion-zoo zoo verify`.")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit} must be >= 1.")
    mismatches = 0
    for name in args.names or list_pretrained():
        r = args.verifier(name, limit=args.limit)
        if "skipped" in r:
            print(f"{name}: skipped: {r['skipped']}")
            continue
        mismatches += not r["matches"] and args.limit is None
        verdict = "matches" if r["matches"] else ("checked on part of the test split" if args.limit else "DIFFERS")
        print(f"{name}: card {r['card_test_accuracy']:.4f}, re-measured {r['measured_test_accuracy']:.4f} on "
              f"{r['dataset']} test ({r['rows']} rows): {verdict}")
    return 1 if mismatches else 0


def _export(args: argparse.Namespace) -> int:
    from .export import export, sidecar_path, verify_export
    from .hub import from_pretrained

    model = from_pretrained(args.name)
    out = export(model, args.output, format=args.format, fold=not args.no_fold)
    print(f"exported {args.name} to {out} ({args.format}); preprocessing settings in {sidecar_path(out)}")
    if args.verify:
        diff = verify_export(model, out, format=args.format)
        print(f"verified at batch 3 with longer texts/clips than traced: max abs difference vs eager {diff:.3g}")
        if diff > 1e-3:
            print(f"fusion-zoo export: error: the exported file differs from eager by {diff:.3g} > 1e-3",
                  file=sys.stderr)
            return 1
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    where = push_to_hub(args.model, args.repo_id, token=args.token, private=args.private, dry_run=args.dry_run)
    if args.dry_run:
        files = sorted(p.name for p in Path(where).iterdir())
        print(f"dry run: {where} holds what would be uploaded to {args.repo_id}: {', '.join(files)}")
    else:
        print(f"pushed {args.model} to {where}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.source, args.output)
    print(f"wrote {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import main as serve_main

    return serve_main(args)


def main(argv: Sequence[str] | None = None, table_predictor: Callable[..., Any] | None = None,
         verifier: Callable[..., dict[str, Any]] | None = None) -> int:
    """Run one zoo command; a :class:`FusionZooError` prints one line to stderr and returns 2.

    ``table_predictor``: what ``predict --table`` calls (``recipes.predict_table.predict_table``, passed in by the
    ``fusion-zoo`` command: reading a table is the recipes layer's job, above this one). ``verifier``: what
    ``zoo verify`` calls (``recipes.verify.verify``: it reads the card's dataset).
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    args.table_predictor, args.verifier = table_predictor, verifier
    handlers = {"predict": _predict, "zoo": _zoo, "export": _export, "convert": _convert, "serve": _serve,
                "push": _push}
    try:
        return handlers[args.command](args)
    except FusionZooError as e:
        print(f"fusion-zoo {args.command}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
