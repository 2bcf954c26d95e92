"""The Gradio page of `asymflow serve`: prompt → optional reference → size → Generate (live steps, cancel) → preview,
download, history; with --compare-latent the latent base's image from the same noise beside it, with a zoomed crop."""
from __future__ import annotations

import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from orchestration.serve_images import compare_panel, png_with_metadata
from orchestration.serve_inputs import (
    CUSTOM,
    MAX_STEPS,
    MULTIPLE,
    InputError,
    check_guidance,
    check_prompt,
    check_steps,
    load_reference,
    pick_seed,
    resolve_size,
    size_presets,
)
from orchestration.serve_model import Generation, GenerationCancelled, GenerationRequest, ServeBackend

DEFAULT_STEPS = 38  # spec §11.5: the demo page's default (range 4–50)
DEFAULT_GUIDANCE = 4.0
# System fonts only: the default theme's Google fonts would make every page load reach the internet.
FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")
# Small models make small images: show them enlarged with visible pixels instead of a thumbnail.
CSS = "#result img, #comparison img { min-height: 300px; object-fit: contain; image-rendering: pixelated; }"


class Sessions:
    """Per browser session: the cancel flag of its running generation and the step it has reached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cancel: dict[str, threading.Event] = {}
        self.step: dict[str, str] = {}

    def start(self, session: str) -> threading.Event:
        with self._lock:
            self.cancel[session] = event = threading.Event()
            self.step[session] = "the start"
            return event

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self.cancel.get(session) is event:
                del self.cancel[session]

    def request_cancel(self, session: str) -> str | None:
        """Stop the session's running generation; returns the step it had reached, None if none was running."""
        with self._lock:
            event = self.cancel.get(session)
            step = self.step.get(session)
        if event is None:
            return None
        event.set()
        return step


def session_dir(session: str | None) -> str:
    """A directory name for a browser session: Gradio's session hash comes from the client, so anything but a plain
    token is replaced by its digest (no path tricks)."""
    import hashlib

    if session and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session):
        return session
    return hashlib.sha256((session or "").encode()).hexdigest()[:16]


def build_page(backend: ServeBackend, out_dir: Path, *, compare_latent: bool, max_pixels: int) -> Any:
    """The page's gr.Blocks (not launched)."""
    presets = size_presets(backend.resolution)
    sessions = Sessions()
    res = backend.resolution

    with gr.Blocks(title="asymflow serve") as page:
        gr.Markdown(f"## asymflow · `{backend.source}`\nPixel-space AsymFlow model, trained at {res}×{res}. "
                    f"Sizes up to {max_pixels:,} pixels, sides multiples of {MULTIPLE}. "
                    "An empty prompt is allowed: it gives an unconditional sample.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                reference = gr.File(label="Reference image (optional)", file_count="single", type="filepath",
                                    elem_id="reference")
                ref_preview = gr.Image(label="Reference", interactive=False, visible=False, height=160,
                                       elem_id="reference-preview")
                size = gr.Radio([*presets, CUSTOM], value=next(iter(presets)), label="Size", elem_id="size")
                with gr.Row(visible=False) as custom_row:
                    width = gr.Number(value=res, precision=0, step=MULTIPLE, label="Width", elem_id="width")
                    height = gr.Number(value=res, precision=0, step=MULTIPLE, label="Height", elem_id="height")
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(1.0, 10.0, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance",
                                     elem_id="guidance")
                with gr.Row():
                    random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                # "adaptive" (asymflow.adaptive) is listed when the pipeline offers it; it picks its own steps.
                sampler = gr.Radio(list(backend.samplers), value=backend.samplers[0], label="Sampler",
                                   info="adaptive: error-controlled steps (Steps is ignored; evaluations shown)",
                                   visible=len(backend.samplers) > 1, elem_id="sampler")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="status")
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                                  elem_id="result")
                gr.Markdown("**Same noise ε**, left: this pixel model; right: the latent model it was converted "
                            "from, decoded by its autoencoder. Below: their centres, 4× zoom.", visible=compare_latent)
                comparison = gr.Image(show_label=False, type="filepath", format="png", interactive=False,
                                      visible=compare_latent, elem_id="comparison")
                download = gr.DownloadButton("Download PNG", value=None, interactive=False, elem_id="download")
                history = gr.Gallery(label="This session", columns=6, fit_columns=False, height=180,
                                     object_fit="contain", elem_id="history")
        history_state = gr.State([])

        def on_size(choice: str) -> Any:
            return gr.update(visible=choice == CUSTOM)

        def on_reference(path: str | None) -> dict:
            if not path:
                return {status: "Reference image removed.", ref_preview: gr.update(value=None, visible=False)}
            try:
                im = load_reference(path)
            except InputError as e:
                return {status: f"**Error:** {e}", ref_preview: gr.update(value=None, visible=False)}
            note = "" if backend.supports_reference else " (this model does not use reference images yet)"
            return {status: f"Reference image {im.width}×{im.height} accepted{note}.",
                    ref_preview: gr.update(value=im, visible=True)}

        def run(prompt_text, negative_text, ref_path, size_choice, w, h, n_steps, w_cfg, rnd, seed_value,
                sampler_name, past, request: gr.Request):
            """Validate, sample in a worker thread while streaming "step i/N", then publish the PNG."""
            session = session_dir(request.session_hash)
            try:
                prompt_ok = check_prompt(prompt_text)
                negative_ok = check_prompt(negative_text, "negative prompt")
                wd, ht = resolve_size(size_choice, w, h, res, max_pixels)
                req = GenerationRequest(prompt_ok, negative_ok, wd, ht, check_steps(n_steps), check_guidance(w_cfg),
                                        pick_seed(rnd, seed_value), load_reference(ref_path), sampler_name)
            except InputError as e:
                yield {status: f"**Error:** {e}"}
                return
            cancel_event = sessions.start(session)
            steps_q: queue.Queue = queue.Queue()
            box: dict[str, Any] = {}

            def work() -> None:
                # Start/end lines in the server log (wall-clock seconds): they show that generations never overlap.
                log(f"start {req.width}x{req.height} seed {req.seed} at {time.time():.3f}")
                try:
                    box["out"] = backend.generate(req, lambda i, n: steps_q.put((i, n)), cancel_event,
                                                  compare_latent=compare_latent)
                except BaseException as e:  # reported on the page; the server keeps serving
                    box["error"] = e
                    log(f"{'cancelled' if isinstance(e, GenerationCancelled) else 'failed'}: {type(e).__name__}")
                finally:
                    sessions.finish(session, cancel_event)
                    log(f"end {req.width}x{req.height} seed {req.seed} at {time.time():.3f}")
                    steps_q.put(None)

            thread = threading.Thread(target=work, name="asymflow-serve-generate", daemon=True)
            thread.start()
            yield {status: f"Generating {req.width}×{req.height}, seed {req.seed} …"}
            while (item := steps_q.get()) is not None:
                done, total = item  # total 0: the adaptive sampler, which counts model evaluations instead
                sessions.step[session] = f"step {done}/{total}" if total else f"model evaluation {done}"
                yield {status: f"Generating {req.width}×{req.height}, seed {req.seed}: {sessions.step[session]}"}
            thread.join()
            if isinstance(box.get("error"), GenerationCancelled):
                # Said here, by the generation itself, after its last step update: a status written by the Cancel
                # button's own event could arrive before that update and be overwritten by it.
                yield {status: f"Cancelled at {sessions.step[session]}."}
                return
            if "error" in box:
                yield {status: _error_message(box["error"], req)}
                return
            gen: Generation = box["out"]
            index = len(past) + 1
            settings = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": req.width,
                        "height": req.height, "steps": req.steps if req.sampler == "fixed" else None,
                        "guidance": req.guidance, "seed": req.seed,
                        "sampler": req.sampler, "nfe": gen.nfe, "source": backend.source,
                        "reference_image": req.reference is not None and backend.supports_reference}
            path = png_with_metadata(gen.image, out_dir / session / f"asymflow-{index:03d}-seed{req.seed}.png",
                                     settings)
            panel = None
            if gen.latent_image is not None:
                panel = out_dir / session / f"compare-{index:03d}.png"
                compare_panel(gen.image, gen.latent_image).save(panel)
            past = [*past, (str(path), f"#{index} seed {req.seed}: {req.prompt[:40]}")]
            nfe = f", {gen.nfe} network evaluations" if gen.nfe is not None else ""
            notes = "".join(f" Note: {n}." for n in gen.notes) + ("" if req.prompt else " Empty prompt: unconditional.")
            how = f"{req.steps} steps" if req.sampler == "fixed" else "adaptive sampler"
            yield {status: f"Done: {req.width}×{req.height}, {how}, seed **{req.seed}**, "
                           f"{gen.seconds:.1f} s{nfe}.{notes}",
                   result: str(path), comparison: str(panel) if panel else None,
                   download: gr.update(value=str(path), interactive=True), history: past, history_state: past,
                   seed: req.seed}

        def stop(request: gr.Request) -> Any:
            """Sets the running generation's cancel flag; that generation reports where it stopped (see `run`)."""
            step = sessions.request_cancel(session_dir(request.session_hash))
            return gr.update() if step else "Cancelled (nothing was running)."

        size.change(on_size, size, custom_row)
        reference.upload(on_reference, reference, [status, ref_preview])
        reference.clear(on_reference, reference, [status, ref_preview])
        # One generation at a time over the whole server (concurrency_limit=1): a second click, from this tab or
        # another, waits in Gradio's queue instead of racing the first for memory.
        generate.click(run, [prompt, negative, reference, size, width, height, steps, guidance, random_seed,
                                   seed, sampler, history_state],
                             [status, result, comparison, download, history, history_state, seed],
                             concurrency_limit=1, concurrency_id="generate", show_progress="minimal",
                             show_progress_on=[result])
        # No `cancels=[job]`: Gradio would stop the generator before it reports the cancellation; the flag set by
        # `stop` ends the sampler at its next step and the generator then says so.
        cancel.click(stop, None, status, queue=False)
    return page


def log(message: str) -> None:
    print(f"asymflow serve: {message}", file=sys.stderr, flush=True)


def _error_message(error: BaseException, req: GenerationRequest) -> str:
    """The page's text for a generation that failed after validation."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return (f"**Error:** out of device memory at {req.width}×{req.height}; choose a smaller size "
                "(or start the server with a lower `--max-pixels`).")
    return f"**Error:** generation failed: {type(error).__name__}: {error}"


def theme() -> Any:
    return gr.themes.Default(font=list(FONTS), font_mono=list(MONO_FONTS))
