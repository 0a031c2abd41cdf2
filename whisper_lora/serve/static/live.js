// The web UI's Live tab: the microphone streamed over /v1/realtime, as OpenAI's browser clients stream it.
// Gradio's streaming audio component hands chunks to the server one event at a time and drops those that
// arrive while one is being processed (a decode takes longer than a chunk lasts), and its stop event can
// run before the last chunk: words in the middle and at the end were lost. Here the browser sends every
// 100 ms of audio on one WebSocket, in order, and on Stop commits the buffer and waits for the last
// transcript before it closes.
(() => {
  const RATE = 24000;  // Hz: what the session announces (OpenAI's audio/pcm rate)
  const PIECE = RATE / 10;  // samples per append event: 100 ms, as a microphone delivers them
  const FINISH_MS = 60000;  // how long Stop waits for the last transcript
  const TAP = `class Tap extends AudioWorkletProcessor {
    process(inputs) { const channel = inputs[0][0]; if (channel) this.port.postMessage(channel.slice(0)); return true; }
  }
  registerProcessor("whisper-lora-tap", Tap);`;
  let live = null;

  const byId = (id) => document.getElementById(id);
  const fieldValue = (id) => { const e = document.querySelector(`#${id} input`); return e ? e.value.trim() : ""; };
  const setStatus = (text) => { const e = byId("live-status"); if (e) e.textContent = text; };

  function render() {
    const out = byId("live-out");
    if (!out || !live) return;
    out.replaceChildren(...live.order.map((id) => {
      const item = live.items.get(id), line = document.createElement("p");
      line.textContent = item.text;
      line.className = item.done ? "live-done" : "live-open";
      return line;
    }));
    out.dataset.transcript = live.order.map((id) => live.items.get(id).text.trim()).filter(Boolean).join(" ");
    out.dataset.pending = String(live.order.filter((id) => !live.items.get(id).done).length);
    out.dataset.items = String(live.order.length);
  }

  function item(current, id) {
    if (!current.items.has(id)) { current.items.set(id, {text: "", done: false}); current.order.push(id); }
    return current.items.get(id);
  }

  function settled(current) {
    return current.acknowledged && current.order.every((id) => current.items.get(id).done);
  }

  function onEvent(current, message) {
    const event = JSON.parse(message.data);
    if (event.type === "input_audio_buffer.speech_started") item(current, event.item_id);
    else if (event.type === "conversation.item.input_audio_transcription.delta") item(current, event.item_id).text += event.delta;
    else if (event.type === "conversation.item.input_audio_transcription.completed") {
      Object.assign(item(current, event.item_id), {text: event.transcript, done: true});
    } else if (event.type === "input_audio_buffer.committed" && current.finishing) {
      current.acknowledged = true;  // the server has heard everything up to Stop
    } else if (event.type === "error" && event.error.code === "input_audio_buffer_commit_empty") {
      current.acknowledged = current.finishing;  // nothing was under way at Stop
    } else if (event.type === "error") {
      setStatus("error: " + event.error.message);
    }
    render();
    if (current.finishing && settled(current)) current.finished();
  }

  function send(current, samples) {
    const bytes = new Uint8Array(samples.length * 2), view = new DataView(bytes.buffer);
    samples.forEach((s, i) => view.setInt16(i * 2, Math.max(-1, Math.min(1, s)) * 32767, true));
    let binary = "";
    for (let i = 0; i < bytes.length; i += 8192) binary += String.fromCharCode(...bytes.subarray(i, i + 8192));
    if (current.ws.readyState === WebSocket.OPEN) {
      current.ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: btoa(binary)}));
    }
  }

  // Chromium and Safari capture at the session's 24 kHz; Firefox only at the device's rate, which is then
  // averaged down here (speech has little above 12 kHz to alias)
  function downsampler(rate) {
    const step = rate / RATE;
    let position = 0, carry = [];
    return (samples) => {
      if (step === 1) return samples;
      const input = carry.concat(Array.from(samples)), out = [];
      for (; position + step <= input.length; position += step) {
        let sum = 0, count = 0;
        for (let i = Math.floor(position); i < Math.floor(position + step); i++) { sum += input[i]; count++; }
        out.push(count ? sum / count : 0);
      }
      const used = Math.floor(position);
      carry = input.slice(used);
      position -= used;
      return out;
    };
  }

  async function openCapture(current) {
    const media = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: false,
                                                                     noiseSuppression: false, autoGainControl: false}});
    current.media = media;
    let context, source;
    try {
      context = new AudioContext({sampleRate: RATE});
      source = context.createMediaStreamSource(media);
    } catch (err) {  // Firefox: a context at another rate than the microphone's
      if (context) context.close();
      context = new AudioContext();
      source = context.createMediaStreamSource(media);
    }
    current.context = context;
    await context.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], {type: "application/javascript"})));
    const tap = new AudioWorkletNode(context, "whisper-lora-tap"), mute = context.createGain();
    mute.gain.value = 0;  // the graph must reach the speakers to run; it does so silently
    source.connect(tap).connect(mute).connect(context.destination);
    const resample = downsampler(context.sampleRate);
    tap.port.onmessage = (e) => {
      if (current.finishing) return;
      current.pending.push(...resample(e.data));
      while (current.pending.length >= PIECE) send(current, current.pending.splice(0, PIECE));
    };
    current.tap = tap;
  }

  function stopCapture(current) {
    if (current.tap) current.tap.port.onmessage = null;
    if (current.media) current.media.getTracks().forEach((t) => t.stop());
    if (current.context) current.context.close();
    current.media = current.context = current.tap = null;
  }

  async function start() {
    if (live) return;
    const token = (document.querySelector("#live-token textarea, #live-token input") || {}).value || "";
    const language = fieldValue("live-language");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime?intent=transcription`;
    const ws = new WebSocket(url, token ? ["realtime", "openai-insecure-api-key." + token] : ["realtime"]);
    const current = live = {ws, items: new Map(), order: [], pending: [], finishing: false, acknowledged: false,
                            finished: () => {}};
    render();
    setStatus("connecting");
    ws.onmessage = (message) => onEvent(current, message);
    ws.onclose = () => {
      if (live === current && !current.finishing) { setStatus("disconnected (reload the page if this lasts)"); }
      stopCapture(current);
      if (live === current && !current.finishing) live = null;
      current.finished();
    };
    await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("cannot connect")); });
    if (live !== current || current.finishing) return;  // stopped while connecting
    ws.send(JSON.stringify({type: "session.update", session: {type: "transcription", audio: {input: {
      format: {type: "audio/pcm", rate: RATE},
      transcription: {model: fieldValue("live-model") || "whisper-1", language: language && !language.startsWith("auto") ? language : null},
      turn_detection: {type: "server_vad", silence_duration_ms: 500}}}}}));
    await openCapture(current);
    if (live !== current || current.finishing) { stopCapture(current); return; }
    setStatus("listening");
  }

  async function stop() {
    if (!live || live.finishing) return;
    const current = live;
    current.finishing = true;
    if (current.pending.length) send(current, current.pending.splice(0));
    stopCapture(current);
    // 0.6 s of silence: the server's VAD (500 ms) ends an utterance still under way before the commit
    for (let i = 0; i < 6; i++) send(current, new Array(PIECE).fill(0));
    if (current.ws.readyState !== WebSocket.OPEN) {  // still connecting, or gone: nothing to wait for
      current.ws.close();
      live = null;
      setStatus("stopped");
      return;
    }
    setStatus("finishing");
    // the server answers the commit after every piece of audio sent before it: then the last transcript
    const done = new Promise((resolve) => { current.finished = resolve; setTimeout(resolve, FINISH_MS); });
    current.ws.send(JSON.stringify({type: "input_audio_buffer.commit"}));
    await done;
    current.ws.close();
    render();
    live = null;
    setStatus("stopped");
  }

  document.addEventListener("click", (e) => {
    if (e.target.closest("#live-start")) {
      start().catch((err) => { setStatus("error: " + err.message); if (live) { stopCapture(live); live = null; } });
    }
    if (e.target.closest("#live-stop")) stop();
  });
})();
