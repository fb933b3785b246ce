"""`rigface edit`: change a portrait's expression, head pose or lighting to match a driver image."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="edit a portrait's expression, pose or lighting after a driver image")
    p.add_argument("--source", required=True, action="append",
                   help="portrait to edit (path or s3:// URI); repeat to edit several in batches")
    p.add_argument("--driver", required=True, action="append",
                   help="image whose expression/pose/lighting to take; repeat for several (one source or one "
                        "driver is paired with each of the others)")
    p.add_argument("--edit", default="all", choices=["expression", "pose", "lighting", "all"])
    p.add_argument("--model", required=True,
                   help="trained model: folder, s3:// URI, or MLflow URI (models:/name/version, runs:/id/path)")
    p.add_argument("--out", required=True,
                   help="output image (png/jpg; path or s3:// URI); with several edits, a folder for NNN.png files")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: evaluate.num_inference_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-conditions", action="store_true", help="also write the render and background next to --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, cfg: RigFaceConfig) -> int:
    import io
    import time

    from PIL import Image
    from rich.console import Console

    from rigface.data import storage
    from rigface.edit import EditError, PortraitEditor, read_image

    console = Console(stderr=True)
    n_src, n_drv = len(args.source), len(args.driver)
    if n_src != 1 and n_drv != 1 and n_src != n_drv:
        console.print(f"[red]error:[/red] give one --source or as many as --driver ({n_src} and {n_drv})")
        return 2
    try:
        sources = [read_image(s) for s in args.source]
        drivers = [read_image(d) for d in args.driver]
        with console.status("loading the model ..."):
            editor = PortraitEditor.load(args.model, cfg)
        t0 = time.monotonic()
        with console.status(f"editing ({args.edit}) ..."):
            results = editor.edit_many(sources, drivers, edit=args.edit, num_inference_steps=args.steps,
                                       seed=args.seed)
    except (EditError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except Exception as exc:  # a model folder that does not load (CheckpointError, a bad MLflow URI, ...)
        if type(exc).__name__ not in ("CheckpointError", "MlflowException"):
            raise
        console.print(f"[red]error:[/red] cannot load the model {args.model}: {exc}")
        return 1

    def save(arr, url, fmt="PNG"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        storage.write_bytes(url, buf.getvalue())

    outs = [args.out] if len(results) == 1 else [storage.join(args.out, f"{i:03d}.png") for i in range(len(results))]
    for result, out in zip(results, outs):
        save(result.image, out, "JPEG" if out.lower().endswith((".jpg", ".jpeg")) else "PNG")
        if args.save_conditions:
            stem = out.rsplit(".", 1)[0]
            save(result.render, f"{stem}.render.png")
            save(result.background, f"{stem}.background.png")
            save(result.crop, f"{stem}.crop.png")
    where = args.out if len(outs) == 1 else f"{len(outs)} edits to {args.out}/"
    console.print(f"wrote {where} ({time.monotonic() - t0:.1f} s)")
    return 0
