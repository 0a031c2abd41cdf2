"""`whisper-lora ui`: the web UI on its own (the serve app, opened in the browser once the model is loaded)."""
from __future__ import annotations

import threading
import time
import urllib.request

from ..config import ServeConfig, UIConfig
from . import serve


def _open_when_ready(url: str) -> None:
    import webbrowser

    for _ in range(600):
        try:
            with urllib.request.urlopen(url.rsplit("/ui", 1)[0] + "/health", timeout=2) as response:
                if response.status == 200:
                    webbrowser.open(url)
                    return
        except OSError:
            pass
        time.sleep(0.5)


def run(config: UIConfig) -> int:
    url = f"http://{config.host}:{config.port}/ui/"
    if config.browser:
        threading.Thread(target=_open_when_ready, args=(url,), daemon=True).start()
    print(f"whisper-lora: the web UI is at {url}", flush=True)
    return serve.run(ServeConfig(host=config.host, port=config.port, model=config.model, adapters=config.adapters,
                                 api_key=config.api_key, device=config.device, dtype=config.dtype,
                                 audio_ctx=config.audio_ctx, policy=config.policy))
