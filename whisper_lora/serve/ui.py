"""The web UI: try a model or adapter on a recording, compare two side by side, or talk to one live.

Gradio, mounted at /ui in the same FastAPI app as the API (`gr.mount_gradio_app`): Hugging Face users
know it, it ships audio upload, recording and streaming widgets, and it calls our Python directly, so
the page uses the same service, batcher and adapters as the API with no second server. Every action
runs through `TranscriptionService`; errors show the same one-line message the CLI prints.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..decode import DecodeOptions, Segment, TranscriptionInfo, join_text
from ..errors import UserError
from ..writers import WRITERS

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: this may run with no network at all

import gradio as gr  # noqa: E402  (after the analytics switch)

AUTO = "auto (detect)"


def UserMessage(message: str) -> gr.Error:
    """The one-line message the CLI would print, as a notice on the page (not a traceback in the server log)."""
    return gr.Error(message, duration=None, print_exception=False)
DOWNLOADS = ("txt", "srt", "vtt", "json")
LIVE_SAMPLE_RATE = 16_000


def _table(segments: list[Segment]) -> list[list]:
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text,
             f"{s.sentiment.label} ({s.sentiment.score:.2f})" if s.sentiment else ""] for s in segments]


def word_diff(a: str, b: str, language: str | None) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """Both texts as (word, mark) pairs, words the other text lacks at that place marked; for languages
    written without spaces the words are characters, as CER counts them."""
    from ..constants import NO_SPACE_LANGUAGES

    spaced = language not in NO_SPACE_LANGUAGES
    left, right = (a.split(), b.split()) if spaced else (list(a.replace(" ", "")), list(b.replace(" ", "")))
    key = lambda words: [w.lower().strip(".,!?;:。，？！") for w in words]  # noqa: E731
    gap = " " if spaced else ""
    marked_a, marked_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=key(left), b=key(right), autojunk=False).get_opcodes():
        marked_a += [(w + gap, None if op == "equal" else "differs") for w in left[i1:i2]]
        marked_b += [(w + gap, None if op == "equal" else "differs") for w in right[j1:j2]]
    return marked_a, marked_b


def build(get_service: Callable[[], object], sentiment_model: str | None = None) -> gr.Blocks:
    """The Blocks app; `get_service()` returns the running TranscriptionService (or raises while loading)."""

    def service():
        try:
            return get_service()
        except Exception as exc:  # still loading, or failed to load
            raise UserMessage(getattr(exc, "message", str(exc))) from None

    def model_choices():
        ids = [m.id for m in service().models()]
        return gr.update(choices=ids, value=ids[0])

    def transcribe(path: str | None, model: str, language: str, task: str, timestamps: bool, words: bool,
                   sentiment: bool, progress: gr.Progress) -> tuple[list[Segment], TranscriptionInfo]:
        if not path:
            raise UserMessage("no audio: upload a file or record from the microphone first")
        svc = service()
        options = DecodeOptions(task=task, word_timestamps=words, without_timestamps=not (timestamps or words))
        try:
            segments, info = svc.transcribe(path, model, None if language == AUTO else language, options)
            collected = []
            for segment in segments:  # long files: the bar follows the decoded audio
                collected.append(segment)
                progress(min(1.0, segment.end / max(info.duration, 1e-6)), desc=f"{segment.end:.0f} of "
                         f"{info.duration:.0f} s")
        except UserError as exc:
            name = Path(path).name
            raise UserMessage(str(exc).replace(str(path), name)) from None
        if sentiment:
            from dataclasses import replace

            from ..sentiment import annotate

            try:
                collected, overall, note = annotate(collected, join_text(collected, info.language), info.language,
                                                    sentiment_model)
            except UserError as exc:
                raise UserMessage(str(exc)) from None
            info = replace(info, sentiment=overall, sentiment_note=note)
        return collected, info

    def describe(info: TranscriptionInfo) -> str:
        if info.language_probability is not None:
            line = f"**Language:** {info.language} (detected, p = {info.language_probability:.2f})"
        else:
            line = f"**Language:** {info.language}"
        line += f" · **Duration:** {info.duration:.1f} s"
        if info.sentiment is not None:
            line += f" · **Sentiment:** {info.sentiment.label} ({info.sentiment.score:.2f})"
        elif info.sentiment_note:
            line += f" · *{info.sentiment_note}*"
        return line

    def run_transcribe(path, model, language, task, timestamps, words, sentiment, progress=gr.Progress()):
        segments, info = transcribe(path, model, language, task, timestamps, words, sentiment, progress)
        text = join_text(segments, info.language)
        folder = Path(tempfile.mkdtemp(prefix="whisper-lora-ui-"))
        stem = Path(path).stem or "transcript"
        files = []
        for fmt in DOWNLOADS:
            target = folder / f"{stem}.{fmt}"
            with open(target, "w", encoding="utf-8") as out:
                WRITERS[fmt](segments, info, text, out)
            files.append(str(target))
        return describe(info), _table(segments), text, files

    def run_compare(path, model_a, model_b, language, reference, progress=gr.Progress()):
        results = []
        for model in (model_a, model_b):
            segments, info = transcribe(path, model, language, "transcribe", False, False, False, progress)
            results.append((join_text(segments, info.language), info))
        (text_a, info), (text_b, _) = results
        marked_a, marked_b = word_diff(text_a, text_b, info.language)
        scores = []
        if reference and reference.strip():
            from ..text import error_rate

            for model, text in ((model_a, text_a), (model_b, text_b)):
                scores.append([model, f"{error_rate([reference], [text], 'cer', [info.language]):.2%}",
                               f"{error_rate([reference], [text], 'wer', [info.language]):.2%}"])
        return marked_a, marked_b, gr.update(value=scores, visible=bool(scores))

    # ---- live microphone: the realtime streaming core, one stream per browser session ------------------

    def live_start(model, language):
        from ..streaming import StreamingTranscriber

        svc = service()
        lang = None if language == AUTO else language

        def decode(audio, options):
            return list(svc.transcribe(audio, model, lang, options)[0])

        return {"stream": StreamingTranscriber(decode, lang), "lines": [], "line": "", "partial": "",
                "resampler": None, "rate": None}

    def live_render(state) -> str:
        done = "\n".join(state["lines"])
        current = state["line"] + (f" *{state['partial']}*" if state["partial"] else "")
        return (done + "\n" + current).strip() if current.strip() else done

    def live_apply(state, events) -> None:
        from ..streaming import Confirmed, Partial, SpeechStopped

        for event in events:
            if isinstance(event, Confirmed):
                state["line"] += event.delta
                state["partial"] = ""
            elif isinstance(event, Partial):
                state["partial"] = event.text
            elif isinstance(event, SpeechStopped):
                state["lines"].append(event.text)
                state["line"], state["partial"] = "", ""

    def live_chunk(chunk, state, model, language):
        if chunk is None:
            return state, gr.update()
        if state is None:
            state = live_start(model, language)
        rate, samples = chunk
        audio = samples.astype(np.float32)
        if samples.dtype.kind == "i":
            audio /= float(np.iinfo(samples.dtype).max)
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != LIVE_SAMPLE_RATE:
            import soxr

            if state["resampler"] is None or state["rate"] != rate:
                state["resampler"], state["rate"] = soxr.ResampleStream(rate, LIVE_SAMPLE_RATE, 1, dtype="float32"), rate
            audio = state["resampler"].resample_chunk(audio)
        live_apply(state, state["stream"].feed(audio))
        return state, live_render(state)

    def live_stop(state):
        if state is None:
            return None, gr.update()
        live_apply(state, state["stream"].commit())
        text = live_render(state)
        return None, text

    # ---- the page -------------------------------------------------------------------------------------

    with gr.Blocks(title="whisper-lora") as page:
        gr.Markdown("# whisper-lora\nTry the served Whisper models and LoRA adapters on your own audio, compare "
                    "two of them, or talk to one live.")
        with gr.Tab("Transcribe"):
            with gr.Row():
                with gr.Column():
                    audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio",
                                     elem_id="audio")
                    model = gr.Dropdown(label="Model or adapter", choices=["whisper-1"], value="whisper-1",
                                        elem_id="model")
                    language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO, elem_id="language")
                    task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task")
                    with gr.Row():
                        timestamps = gr.Checkbox(value=True, label="Segment timestamps")
                        words = gr.Checkbox(value=False, label="Word timestamps")
                        sentiment = gr.Checkbox(value=False, label="Sentiment", elem_id="sentiment")
                    go = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
                with gr.Column():
                    detected = gr.Markdown(elem_id="detected")
                    text = gr.Textbox(label="Text", lines=5, elem_id="text")
                    segments = gr.Dataframe(headers=["start", "end", "text", "sentiment"], label="Segments", wrap=True,
                                            elem_id="segments", interactive=False,
                                            column_widths=["11%", "11%", "58%", "20%"])
                    files = gr.File(label="Download", file_count="multiple", elem_id="downloads")
            go.click(run_transcribe, [audio, model, language, task, timestamps, words, sentiment],
                     [detected, segments, text, files])
        with gr.Tab("Compare"):
            with gr.Row():
                compare_audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio",
                                         elem_id="compare-audio")
                with gr.Column():
                    model_a = gr.Dropdown(label="Model A", choices=["whisper-1"], value="whisper-1", elem_id="model-a")
                    model_b = gr.Dropdown(label="Model B", choices=["whisper-1"], value="whisper-1", elem_id="model-b")
                    compare_language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO)
            reference = gr.Textbox(label="Reference text (optional: gives CER and WER)", lines=2, elem_id="reference")
            compare = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                text_a = gr.HighlightedText(label="Model A", color_map={"differs": "#f5a3a3"}, elem_id="text-a",
                                            show_inline_category=False, combine_adjacent=True)
                text_b = gr.HighlightedText(label="Model B", color_map={"differs": "#a3d9a5"}, elem_id="text-b",
                                            show_inline_category=False, combine_adjacent=True)
            scores = gr.Dataframe(headers=["model", "CER", "WER"], label="Error rates against the reference",
                                  visible=False, elem_id="scores", interactive=False)
            compare.click(run_compare, [compare_audio, model_a, model_b, compare_language, reference],
                          [text_a, text_b, scores])
        with gr.Tab("Live"):
            gr.Markdown("Speak: confirmed text appears as you go, the words still being decided in *italics*.")
            with gr.Row():
                live_model = gr.Dropdown(label="Model or adapter", choices=["whisper-1"], value="whisper-1")
                live_language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO)
            microphone = gr.Audio(sources=["microphone"], streaming=True, label="Microphone", elem_id="live-mic")
            live_text = gr.Markdown(elem_id="live-text")
            live_state = gr.State(None)
            microphone.stream(live_chunk, [microphone, live_state, live_model, live_language],
                              [live_state, live_text], stream_every=0.5, time_limit=None)
            microphone.stop_recording(live_stop, [live_state], [live_state, live_text])

        def on_load():
            svc = service()
            ids = [m.id for m in svc.models()]
            languages = [AUTO] + sorted(svc.backend.languages)
            model_update = gr.update(choices=ids, value=ids[0])
            second = gr.update(choices=ids, value=ids[-1])
            language_update = gr.update(choices=languages, value=AUTO)
            return (model_update, language_update, model_update, second, language_update, model_update,
                    language_update)

        page.load(on_load, None, [model, language, model_a, model_b, compare_language, live_model, live_language])
    return page


def mount(app, get_service, path: str = "/ui", api_key: str | None = None, sentiment_model: str | None = None):
    """Mount the UI in the FastAPI app. With an API key the page asks for it (any user name)."""
    import secrets

    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    auth = (lambda user, password: secrets.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(app, build(get_service, sentiment_model), path=path, ssr_mode=False, theme=theme,
                               auth=auth, auth_message="Log in with any name and the server's API key." if auth else None,
                               footer_links=["gradio"])

