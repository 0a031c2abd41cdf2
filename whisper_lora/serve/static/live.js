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

  function item(id) {
    if (!live.items.has(id)) { live.items.set(id, {text: "", done: false}); live.order.push(id); }
    return live.items.get(id);
  }

  function onEvent(message) {
    const event = JSON.parse(message.data);
    if (event.type === "input_audio_buffer.speech_started") item(event.item_id);
    else if (event.type === "conversation.item.input_audio_transcription.delta") item(event.item_id).text += event.delta;
    else if (event.type === "conversation.item.input_audio_transcription.completed") {
      Object.assign(item(event.item_id), {text: event.transcript, done: true});
    } else if (event.type === "error" && event.error.code !== "input_audio_buffer_commit_empty") {
      setStatus("error: " + event.error.message);
    }
    render();
    if (live.finishing && live.order.every((id) => live.items.get(id).done)) live.finished();
  }

  function send(samples) {
    const bytes = new Uint8Array(samples.length * 2), view = new DataView(bytes.buffer);
    samples.forEach((s, i) => view.setInt16(i * 2, Math.max(-1, Math.min(1, s)) * 32767, true));
    let binary = "";
    for (let i = 0; i < bytes.length; i += 8192) binary += String.fromCharCode(...bytes.subarray(i, i + 8192));
    live.ws.send(JSON.stringify({type: "input_audio_buffer.append", audio: btoa(binary)}));
  }

  async function start() {
    if (live) return;
    const token = (document.querySelector("#live-token textarea, #live-token input") || {}).value || "";
    const language = fieldValue("live-language");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime?intent=transcription`;
    const ws = new WebSocket(url, token ? ["realtime", "openai-insecure-api-key." + token] : ["realtime"]);
    live = {ws, items: new Map(), order: [], pending: [], finishing: false, finished: () => {}};
    render();
    setStatus("connecting");
    ws.onmessage = onEvent;
    ws.onclose = () => { if (live && live.ws === ws && !live.finishing) { setStatus("disconnected"); stopCapture(); live = null; } };
    await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("cannot connect")); });
    ws.send(JSON.stringify({type: "session.update", session: {type: "transcription", audio: {input: {
      format: {type: "audio/pcm", rate: RATE},
      transcription: {model: fieldValue("live-model") || "whisper-1", language: language && !language.startsWith("auto") ? language : null},
      turn_detection: {type: "server_vad", silence_duration_ms: 500}}}}}));
    live.media = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: false,
                                                                    noiseSuppression: false, autoGainControl: false}});
    live.context = new AudioContext({sampleRate: RATE});
    await live.context.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], {type: "application/javascript"})));
    const tap = new AudioWorkletNode(live.context, "whisper-lora-tap"), mute = live.context.createGain();
    mute.gain.value = 0;  // the graph must reach the speakers to run; it does so silently
    live.context.createMediaStreamSource(live.media).connect(tap).connect(mute).connect(live.context.destination);
    tap.port.onmessage = (e) => {
      live.pending.push(...e.data);
      while (live.pending.length >= PIECE) send(live.pending.splice(0, PIECE));
    };
    setStatus("listening");
  }

  function stopCapture() {
    if (!live) return;
    if (live.media) live.media.getTracks().forEach((t) => t.stop());
    if (live.context) live.context.close();
    live.media = live.context = null;
  }

  async function stop() {
    if (!live || live.finishing) return;
    const current = live;
    stopCapture();
    if (current.pending.length) send(current.pending.splice(0));
    current.finishing = true;
    setStatus("finishing");
    const done = new Promise((resolve) => { current.finished = resolve; setTimeout(resolve, FINISH_MS); });
    current.ws.send(JSON.stringify({type: "input_audio_buffer.commit"}));
    if (current.order.every((id) => current.items.get(id).done)) setTimeout(current.finished, 1500);
    await done;
    current.ws.close();
    setStatus("stopped");
    live = Object.assign(current, {finishing: false});
    render();
    live = null;
  }

  document.addEventListener("click", (e) => {
    if (e.target.closest("#live-start")) start().catch((err) => { setStatus("error: " + err.message); stopCapture(); live = null; });
    if (e.target.closest("#live-stop")) stop();
  });
})();
