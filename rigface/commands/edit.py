"""`rigface edit`: change a portrait's expression, head pose or lighting to match a driver image."""

from __future__ import annotations

import argparse

from rigface.config import RigFaceConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("edit", help="edit a portrait's expression, pose or lighting after a driver image")
    p.add_argument("--source", required=True, help="portrait to edit (path or s3:// URI)")
    p.add_argument("--driver", required=True, help="image whose expression/pose/lighting to take")
    p.add_argument("--edit", default="all", choices=["expression", "pose", "lighting", "all"])
    p.add_argument("--model", required=True,
                   help="trained model: folder, s3:// URI, or MLflow URI (models:/name/version, runs:/id/path)")
    p.add_argument("--out", required=True, help="output image (png/jpg; path or s3:// URI)")
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
    try:
        source = read_image(args.source)
        driver = read_image(args.driver)
        with console.status("loading the model ..."):
            editor = PortraitEditor.load(args.model, cfg)
        t0 = time.monotonic()
        with console.status(f"editing ({args.edit}) ..."):
            result = editor.edit(source, driver, edit=args.edit, num_inference_steps=args.steps, seed=args.seed)
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

    save(result.image, args.out, "JPEG" if args.out.lower().endswith((".jpg", ".jpeg")) else "PNG")
    if args.save_conditions:
        stem = args.out.rsplit(".", 1)[0]
        save(result.render, f"{stem}.render.png")
        save(result.background, f"{stem}.background.png")
        save(result.crop, f"{stem}.crop.png")
    console.print(f"wrote {args.out} ({time.monotonic() - t0:.1f} s)")
    return 0
