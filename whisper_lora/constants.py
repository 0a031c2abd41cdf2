"""Whisper's facts, each declared once with its unit and where it comes from.

Everything else imports these; nothing here imports anything (so `import whisper_lora` stays light).
"""
from __future__ import annotations

# ---- audio --------------------------------------------------------------------------------------
SAMPLE_RATE = 16_000  # Hz: the only rate Whisper's front end takes
CHUNK_SECONDS = 30  # s: the audio one encoder window holds (shorter input is padded to it)
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # samples in one window (480,000)
HOP_LENGTH = 160  # samples between two log-mel frames (10 ms)
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # log-mel frames per second (100)
N_FRAMES = CHUNK_SECONDS * FRAMES_PER_SECOND  # log-mel frames in one window (3,000)
TIME_PRECISION = 0.02  # s: one timestamp token step (<|0.00|> … <|30.00|>), and one encoder output position (2 frames)

# ---- decoder ------------------------------------------------------------------------------------
MAX_TARGET_TOKENS = 448  # tokens: the decoder's context (max_target_positions), prompt and output together
TASK_PROMPT_TOKENS = 4  # <|startoftranscript|><|lang|><|task|><|notimestamps|>: the longest prompt without text
MAX_NEW_TOKENS = MAX_TARGET_TOKENS - TASK_PROMPT_TOKENS  # tokens one window may generate after that prompt (444)

# ---- files --------------------------------------------------------------------------------------
# Everything FFmpeg (PyAV) or libsndfile decodes that people record speech in; `prepare`, `transcribe`
# and augmentation noise folders all search for these.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".webm", ".aac", ".wma", ".mp4",
                            ".pcm", ".raw"})
RAW_PCM_SUFFIXES = frozenset({".pcm", ".raw"})  # headerless 16-bit little-endian mono at SAMPLE_RATE

# ---- languages ----------------------------------------------------------------------------------
# Written without spaces between words: scored by characters (CER), joined without spaces, and split
# into words per character for word timestamps. openai/whisper's word splitter lists only the first
# six; Khmer and Tibetan separate words no more than Thai does, so they are treated alike here.
NO_SPACE_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})
