"""`asymflow serve SOURCE`: a local generation page for a converted model (Gradio, from the optional `serve` extra)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_PORT = 7860


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1): nobody else can reach the page."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="open a local web page to generate images with a converted model",
        description=(
            "Serve a generation page for SOURCE: prompt, negative prompt, optional reference image, size presets "
            "around the model's training resolution (or custom multiples of 16), steps, guidance, seed, live "
            "progress with cancel, PNG download with the settings in its metadata, and this session's history. "
            "SOURCE: 'bundled' (or the path of assets/tiny_base) for the repo's tiny base, converted at start; "
            "other sources as `asymflow sample` accepts them. Needs the serve extra: pip install 'asymflow[serve]'. "
            "There is no authentication: the page is bound to 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="what to serve: 'bundled', a run dir, an export, a model dir")
    p.add_argument("--step", type=int, default=None, help="run directory: the checkpoint step (default: latest)")
    p.add_argument("--base", default=None,
                   help="adapter or merged model: the latent base ('tiny', 'bundled' or a directory), if not recorded")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--compare-latent", action="store_true",
                   help="also show the latent base's image from the same noise, decoded by its autoencoder")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest width×height accepted (default: 4× the model's training area)")
    p.add_argument("--output-dir", default=None,
                   help="where generated PNGs are written (default: a new temporary directory)")
    p.set_defaults(func=run_serve)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_serve(args: argparse.Namespace) -> int:
    """Load SOURCE, build the page, serve until interrupted."""
    if not 1 <= args.port <= 65535:
        return _fail(f"--port must be 1-65535, got {args.port}")
    if args.max_pixels is not None and args.max_pixels < 64 * 64:
        return _fail(f"--max-pixels must be at least {64 * 64}, got {args.max_pixels}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (entry point: env is ours to set)
    try:
        import gradio  # noqa: F401
    except ImportError:
        return _fail("asymflow serve needs Gradio, from the serve extra: pip install 'asymflow[serve]'")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda, but torch sees no CUDA device")
    from orchestration.serve_inputs import default_max_pixels
    from orchestration.serve_model import load_backend
    from orchestration.serve_page import CSS, build_page, theme

    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}: this page has NO authentication; anyone who can reach "
              f"{args.host}:{args.port} can generate images on this machine", file=sys.stderr)
    try:
        backend = load_backend(args.source, args.device, compare_latent=args.compare_latent, base=args.base,
                               step=args.step)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.compare_latent and backend.latent is None:
        return _fail(f"--compare-latent: the latent base and its autoencoder are not available for {args.source}")
    max_pixels = args.max_pixels or default_max_pixels(backend.resolution)
    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="asymflow-serve-")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    page = build_page(backend, out_dir, compare_latent=args.compare_latent, max_pixels=max_pixels)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                    share=False, ssr_mode=False, allowed_paths=[str(out_dir)], max_file_size="20mb",
                    theme=theme(), css=CSS, footer_links=[])
    except OSError as e:  # port taken
        return _fail(f"cannot serve on {args.host}:{args.port}: {e}")
    print(f"asymflow serve: {args.source} on {args.device}; open http://{args.host}:{args.port} "
          f"(images in {out_dir}; Ctrl-C stops)", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
    return 0
