// The conversation page: one WebSocket (ws/conversations/<uuid>/, docs/protocol.md)
// carrying microphone audio, typed text and control messages up, and transcripts,
// reply tokens and reply audio down.
//
// - Reconnects with backoff and resumes with {"type":"hello","resume_from":seq}; every
//   stored turn has a unique seq, so replays are de-duplicated by seq and a reply that
//   was streaming when the socket dropped is replaced by its reply.done.
// - Event text only ever reaches the page through textContent.
// - window.parley is a small debug/test hook (the live socket, the state).

import { Player, parleyStats } from "./player.js";

const PROTOCOL = 1;
const FRAME_SAMPLES = 1600; // 100 ms at 16 kHz: the socket's frame size
const RETRY_MS = [500, 1000, 2000, 4000, 8000, 15000];
const PING_EVERY_MS = 25000;
const PTT_TAIL_MS = 300; // keep sending briefly after release so the last word isn't cut
const PREROLL_FRAMES = 2; // frames from before the press, sent with the first push-to-talk frame
const MAX_BUFFERED_BYTES = 256 * 1024;
const MAX_ERRORS_SHOWN = 3;
const MAX_LATENCY_ROWS = 10;
const SERVICE_RESTART = 1012; // a draining server closes with it: reconnect, resume
const FATAL_CLOSES = {
  4400: "This page speaks an older protocol than the server. Reload the page.",
  4401: "You are signed out. Log in again to keep talking.",
  4403: "This conversation belongs to another account.",
  4404: "This conversation does not exist (it may have been deleted).",
  4409: "You have too many conversations open. Close another tab, then reload this page.",
};
const STATUS_LABEL = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  offline: "Offline",
};

const root = document.getElementById("conversation");
const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  log: $("log"),
  errors: $("errors"),
  echoNote: $("echo-note"),
  smallNote: $("small-note"),
  activity: $("activity"),
  talk: $("talk"),
  handsfree: $("handsfree"),
  stop: $("stop"),
  level: $("level"),
  form: $("text-form"),
  input: $("text-input"),
  send: $("send"),
  latencyToggle: $("latency-toggle"),
  latency: $("latency"),
  latencyRows: $("latency-rows"),
  latencyRtt: $("latency-rtt"),
};
const personaName = root.dataset.personaName || "Persona";
const stats = parleyStats();

// --- audio context (shared by capture and playback) ------------------------------

let audioCtx = null;

function audioContext() {
  if (!audioCtx) audioCtx = new AudioContext({ latencyHint: "interactive" });
  return audioCtx;
}

function unlockAudio() {
  // Browsers start audio only after a user gesture; call from gesture handlers.
  const ctx = audioContext();
  if (ctx.state === "suspended") ctx.resume().catch(() => {});
}

const player = new Player(audioContext, {
  onstart: () => refreshActivity(),
  onidle: () => refreshActivity(),
});

// --- status and errors -------------------------------------------------------

function setStatus(state, detail = "") {
  ui.status.dataset.state = state;
  root.dataset.state = state;
  ui.status.textContent = detail ? `${STATUS_LABEL[state]} ${detail}` : STATUS_LABEL[state];
  refreshControls();
}

function showError(message, code = "") {
  const item = document.createElement("p");
  item.className = "error";
  if (code) item.dataset.code = code;
  const text = document.createElement("span");
  text.textContent = message;
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.className = "link dismiss";
  dismiss.textContent = "Dismiss";
  dismiss.setAttribute("aria-label", `Dismiss: ${message}`);
  dismiss.addEventListener("click", () => item.remove());
  item.append(text, " ", dismiss);
  ui.errors.append(item);
  while (ui.errors.children.length > MAX_ERRORS_SHOWN) ui.errors.firstElementChild.remove();
}

function clearErrors(code) {
  for (const item of [...ui.errors.querySelectorAll(`[data-code="${code}"]`)]) item.remove();
}

// --- transcript ---------------------------------------------------------------

const seenSeqs = new Set();
let contiguousSeq = 0; // every seq up to this one has been shown: the resume point
const bySeq = new Map();
const partials = new Map(); // utterance_id -> li (live, not stored)
const finishedUtterances = new Set();
const streaming = new Map(); // reply_id -> li while tokens arrive
const endedReplies = new Set();
const stoppedReplies = new Set(); // audio for these is dropped

function markSeen(seq) {
  seenSeqs.add(seq);
  while (seenSeqs.has(contiguousSeq + 1)) contiguousSeq += 1;
}

function makeMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : personaName;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  return li;
}

function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollIfFollowing(wasNearBottom) {
  if (wasNearBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

function placeStored(li, seq) {
  // Stored turns are in seq order; live partials and streaming replies stay below them.
  li.dataset.seq = String(seq);
  const follow = nearBottom();
  let before = null;
  for (const child of ui.log.children) {
    if (child === li) continue;
    const childSeq = child.dataset.seq;
    if (childSeq === undefined || Number(childSeq) > seq) {
      before = child;
      break;
    }
  }
  ui.log.insertBefore(li, before);
  bySeq.set(seq, li);
  scrollIfFollowing(follow);
}

function appendLive(li) {
  const follow = nearBottom();
  li.setAttribute("aria-hidden", "true"); // announced once, when the stored turn replaces it
  ui.log.append(li);
  scrollIfFollowing(follow);
}

function dropPartials() {
  for (const li of partials.values()) li.remove();
  partials.clear();
}

// --- latency -------------------------------------------------------------------

let pendingTurn = null; // the latest live user turn, waiting for its reply
const turns = new Map(); // reply_id -> {label, stt, token, audio, row}
let turnCount = 0;

function attachTurn(replyId) {
  if (turns.has(replyId) || !pendingTurn) return;
  turnCount += 1;
  const turn = { ...pendingTurn, label: `${turnCount} (${pendingTurn.source})` };
  pendingTurn = null;
  turns.set(replyId, turn);
  renderTurn(turn);
}

function ms(value) {
  return value === null || value === undefined ? "…" : `${Math.round(value)}`;
}

function renderTurn(turn) {
  if (!turn.row) {
    turn.row = document.createElement("tr");
    ui.latencyRows.prepend(turn.row);
    while (ui.latencyRows.children.length > MAX_LATENCY_ROWS) ui.latencyRows.lastElementChild.remove();
  }
  const base = turn.stt ?? 0;
  const word = turn.token === null || turn.token === undefined ? null : base + turn.token;
  const audio = word === null || turn.audio === null || turn.audio === undefined ? null : word + turn.audio;
  const cells = [
    turn.label,
    turn.stt === null ? "typed" : ms(turn.stt),
    word === null ? ms(null) : `${ms(word)} (+${ms(turn.token)})`,
    audio === null ? ms(null) : `${ms(audio)} (+${ms(turn.audio)})`,
  ];
  turn.row.replaceChildren(
    ...cells.map((text, i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      cell.textContent = text;
      return cell;
    }),
  );
}

function setLatencyVisible(visible) {
  ui.latency.hidden = !visible;
  ui.latencyToggle.setAttribute("aria-expanded", String(visible));
  ui.latencyToggle.textContent = visible ? "Hide latency" : "Show latency";
  try {
    localStorage.setItem("parley.latency", visible ? "1" : "0");
  } catch {
    // storage may be unavailable (private mode); the toggle still works
  }
}

// --- server events -----------------------------------------------------------------

let audioIn = null; // {replyId, sampleRate, remaining}: binary frames that follow reply.audio.start
let audioReplyId = null; // the reply whose audio is playing
let hearing = false;

const handlers = {
  ready(e) {
    attempt = 0;
    everLive = true;
    ui.echoNote.hidden = !e.llm_is_offline_echo;
    ui.smallNote.hidden = !e.llm_is_offline_small;
    clearErrors("connection");
    setStatus("live");
    send({ type: "ping", t: performance.now() }); // a first round-trip reading
  },
  "speech.start"() {
    hearing = true;
    if (player.playing) stopPlayback({ tellServer: false }); // barge-in: the server cancels too
    refreshActivity();
  },
  "speech.end"() {
    hearing = false;
    refreshActivity();
  },
  "transcript.partial"(e) {
    if (!e.text || finishedUtterances.has(e.utterance_id)) return;
    let li = partials.get(e.utterance_id);
    if (!li) {
      li = makeMessage("user", "");
      li.classList.add("partial");
      partials.set(e.utterance_id, li);
      appendLive(li);
    }
    li.querySelector(".text").textContent = e.text;
  },
  "transcript.final"(e) {
    if (e.utterance_id) {
      finishedUtterances.add(e.utterance_id);
      const partial = partials.get(e.utterance_id);
      if (partial) partial.remove();
      partials.delete(e.utterance_id);
    }
    if (seenSeqs.has(e.seq)) return;
    markSeen(e.seq);
    const li = makeMessage("user", e.text);
    li.dataset.source = e.source || "";
    placeStored(li, e.seq);
    if (!e.replayed) {
      pendingTurn = { source: e.source === "voice" ? "voice" : "typed", stt: e.source === "voice" ? (e.speech_end_to_final_ms ?? null) : null };
    }
  },
  "transcript.empty"(e) {
    finishedUtterances.add(e.utterance_id);
    const partial = partials.get(e.utterance_id);
    if (partial) partial.remove();
    partials.delete(e.utterance_id);
    flashActivity("No words heard in that stretch of audio.");
  },
  "reply.delta"(e) {
    if (endedReplies.has(e.reply_id) || stoppedReplies.has(e.reply_id)) return;
    let li = streaming.get(e.reply_id);
    if (!li) {
      li = makeMessage("assistant", "");
      li.classList.add("streaming");
      streaming.set(e.reply_id, li);
      appendLive(li);
      attachTurn(e.reply_id);
    }
    const follow = nearBottom();
    li.querySelector(".text").textContent += e.text;
    scrollIfFollowing(follow);
    refreshControls();
  },
  "reply.done"(e) {
    replyEnded(e, false);
  },
  "reply.interrupted"(e) {
    replyEnded(e, true);
  },
  "reply.audio.start"(e) {
    audioIn = e.bytes > 0 ? { replyId: e.reply_id, sampleRate: e.sample_rate, remaining: e.bytes } : null;
    if (e.index === 0 && e.first_token_to_first_audio_ms !== undefined) {
      const turn = turns.get(e.reply_id);
      if (turn) {
        turn.audio = e.first_token_to_first_audio_ms;
        renderTurn(turn);
      }
    }
  },
  error(e) {
    showError(e.message || "Something went wrong.", e.code || "error");
    if (e.code === "quota_exceeded") hearing = false;
    refreshActivity();
  },
  pong(e) {
    if (typeof e.t === "number") {
      ui.latencyRtt.textContent = `Round trip to the server: ${Math.round(performance.now() - e.t)} ms.`;
    }
  },
};

function replyEnded(e, interrupted) {
  const id = e.reply_id;
  if (e.seq === null || e.seq === undefined) {
    // The text was complete; only its audio was cut short.
    stoppedReplies.add(id);
    if (audioReplyId === id) player.stop();
    const li = [...bySeq.values()].find((item) => item.dataset.replyId === id);
    if (li) li.classList.add("cut");
    refreshControls();
    return;
  }
  endedReplies.add(id);
  if (interrupted) {
    stoppedReplies.add(id);
    if (audioReplyId === id) player.stop();
  }
  const live = streaming.get(id);
  if (live) live.remove();
  streaming.delete(id);
  if (!seenSeqs.has(e.seq)) {
    markSeen(e.seq);
    if (e.text) {
      const li = makeMessage("assistant", e.text);
      li.dataset.replyId = id;
      if (interrupted) li.classList.add("interrupted");
      // Stopped while its text streamed, but the text was complete by then: the
      // stop's audio-only `reply.interrupted` may have come first and found no
      // stored message to mark.
      else if (stoppedReplies.has(id)) li.classList.add("cut");
      placeStored(li, e.seq);
    }
  }
  const turn = turns.get(id);
  if (turn && !e.replayed) {
    turn.token = e.final_to_first_token_ms ?? null;
    renderTurn(turn);
  }
  refreshControls();
}

function onBinary(data) {
  if (!audioIn) return; // audio for nothing we asked to hear
  const { replyId, sampleRate } = audioIn;
  audioIn.remaining -= data.byteLength;
  if (audioIn.remaining <= 0) audioIn = null;
  if (stoppedReplies.has(replyId)) return;
  audioReplyId = replyId;
  player.enqueue(data, sampleRate);
}

// --- the socket ----------------------------------------------------------------------

let ws = null;
let live = false;
let everLive = false;
let attempt = 0;
let retryTimer = null;
let pingTimer = null;
let stopped = false; // fatal close or page leaving: no more reconnects

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${root.dataset.wsPath}`;
}

function send(message) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(message));
  return true;
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (stopped || (ws && ws.readyState <= WebSocket.OPEN)) return;
  if (!navigator.onLine) {
    setStatus("offline", "— waiting for the network.");
    return;
  }
  setStatus(everLive ? "reconnecting" : "connecting");
  const socket = new WebSocket(socketUrl());
  socket.binaryType = "arraybuffer";
  ws = socket;
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "hello", protocol: PROTOCOL, resume_from: contiguousSeq }));
    clearInterval(pingTimer);
    pingTimer = setInterval(() => send({ type: "ping", t: performance.now() }), PING_EVERY_MS);
  };
  socket.onmessage = (message) => {
    if (socket !== ws) return;
    if (typeof message.data !== "string") {
      onBinary(message.data);
      return;
    }
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (event.type === "ready") live = true;
    const handler = handlers[event.type];
    if (handler) handler(event);
  };
  socket.onclose = (closed) => {
    if (socket !== ws) return;
    onClosed(closed.code);
  };
}

function onClosed(code) {
  ws = null;
  live = false;
  audioIn = null;
  hearing = false;
  clearInterval(pingTimer);
  dropPartials(); // their finals (or nothing) come with the replay
  if (FATAL_CLOSES[code]) {
    stopped = true;
    showError(FATAL_CLOSES[code], "connection");
    setStatus("offline");
    micIdle();
    return;
  }
  if (stopped) {
    setStatus("offline");
    return;
  }
  if (code === SERVICE_RESTART) attempt = 0; // the server drains: go elsewhere at once
  const base = RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)];
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  attempt += 1;
  setStatus(navigator.onLine ? "reconnecting" : "offline", `— retrying in ${Math.max(1, Math.round(delay / 1000))} s.`);
  retryTimer = setTimeout(connect, delay);
}

window.addEventListener("online", () => {
  attempt = 0;
  connect();
});
window.addEventListener("offline", () => {
  if (!live) setStatus("offline", "— waiting for the network.");
});
window.addEventListener("pagehide", () => {
  stopped = true;
  if (ws) ws.close(1000);
});
window.addEventListener("pageshow", (event) => {
  if (!event.persisted) return; // restored from the back/forward cache: talk again
  stopped = false;
  attempt = 0;
  connect();
});

// --- microphone ------------------------------------------------------------------------

const mic = { node: null, source: null, stream: null, starting: null, recent: [] };
let capturing = false; // frames go to the server
let talking = false; // push-to-talk held
let handsFree = false;
let releaseTimer = null;

function micErrorText(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
    case "SecurityError":
      return "Microphone access is blocked. Allow the microphone for this site (the icon in the address bar), then press Talk again. You can still type below.";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one or check your system's sound settings, then try again. You can still type below.";
    case "NotReadableError":
    case "TrackStartError":
    case "AbortError":
      return "The microphone could not be started; another app may be using it. Close that app and try again.";
    case "InsecureContext":
      return "The microphone only works on a secure page (https or localhost). You can still type below.";
    case "NoWorklet":
      return "This browser cannot process microphone audio here (no AudioWorklet). Try a current Chrome, Edge, Firefox or Safari, or type below.";
    default:
      return `The microphone could not be used (${(err && err.message) || "unknown error"}). You can still type below.`;
  }
}

async function micOpen() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw Object.assign(new Error("insecure context"), { name: "InsecureContext" });
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  try {
    const ctx = audioContext();
    if (ctx.state === "suspended") await ctx.resume();
    if (!ctx.audioWorklet) throw Object.assign(new Error("no AudioWorklet"), { name: "NoWorklet" });
    await ctx.audioWorklet.addModule(root.dataset.workletUrl);
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "parley-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: 16000, frameSamples: FRAME_SAMPLES },
    });
    node.port.onmessage = (message) => onWorkletMessage(message.data);
    source.connect(node);
    node.connect(ctx.destination); // silent: keeps the node pulled by the graph
    for (const track of stream.getAudioTracks()) {
      track.addEventListener("ended", () => {
        micClose();
        showError("The microphone stopped (unplugged or switched off).", "mic");
      });
    }
    Object.assign(mic, { node, source, stream });
  } catch (err) {
    for (const track of stream.getTracks()) track.stop();
    throw err;
  }
}

function micEnsure() {
  if (mic.node) return Promise.resolve(true);
  if (!mic.starting) {
    mic.starting = micOpen()
      .then(() => {
        clearErrors("mic");
        root.dataset.mic = "on";
        return true;
      })
      .catch((err) => {
        clearErrors("mic");
        showError(micErrorText(err), "mic");
        root.dataset.mic = "error";
        return false;
      })
      .finally(() => {
        mic.starting = null;
      });
  }
  return mic.starting;
}

function micClose() {
  capturing = false;
  talking = false;
  setHandsFree(false);
  if (mic.source) mic.source.disconnect();
  if (mic.node) {
    mic.node.port.onmessage = null;
    mic.node.disconnect();
  }
  if (mic.stream) for (const track of mic.stream.getTracks()) track.stop();
  Object.assign(mic, { node: null, source: null, stream: null, recent: [] });
  root.dataset.mic = "off";
  ui.level.value = 0;
  refreshControls();
}

function micIdle() {
  capturing = false;
  talking = false;
  setHandsFree(false);
  refreshControls();
}

function sendFrame(pcm) {
  if (!live || ws.bufferedAmount > MAX_BUFFERED_BYTES) return;
  ws.send(pcm);
  stats.framesSent += 1;
}

function onWorkletMessage(data) {
  if (data.type === "level") {
    // about -60 dBFS .. 0 dBFS onto 0 .. 1
    const db = 20 * Math.log10(Math.max(data.rms, 1e-6));
    const value = Math.min(1, Math.max(0, (db + 60) / 60));
    ui.level.value = value;
    ui.level.textContent = `${Math.round(value * 100)}%`;
  } else if (data.type === "frame") {
    if (capturing) {
      sendFrame(data.pcm);
    } else {
      mic.recent.push(data.pcm);
      if (mic.recent.length > PREROLL_FRAMES) mic.recent.shift();
    }
  }
}

function startCapture({ preroll }) {
  if (preroll) for (const pcm of mic.recent) sendFrame(pcm);
  mic.recent = [];
  capturing = true;
  refreshControls();
}

function stopPlayback({ tellServer }) {
  if (tellServer) send({ type: "interrupt" });
  for (const id of streaming.keys()) stoppedReplies.add(id);
  if (audioReplyId && player.playing) {
    // Its audio may all have reached us already: the server has nothing left to
    // stop, so mark here that the rest was not heard.
    stoppedReplies.add(audioReplyId);
    const li = [...bySeq.values()].find((item) => item.dataset.replyId === audioReplyId);
    if (li) li.classList.add("cut");
  }
  player.stop();
  refreshControls();
}

function replyInProgress() {
  return player.playing || streaming.size > 0;
}

function talkStart() {
  if (talking || handsFree || stopped) return;
  unlockAudio();
  talking = true;
  clearTimeout(releaseTimer);
  const wasCapturing = capturing; // still in the tail of the previous press
  if (replyInProgress()) stopPlayback({ tellServer: true });
  refreshControls();
  micEnsure().then((ok) => {
    if (!ok) {
      talking = false;
      refreshControls();
      return;
    }
    if (talking && !capturing) startCapture({ preroll: !wasCapturing });
  });
}

function talkEnd() {
  if (!talking) return;
  talking = false;
  refreshControls();
  if (!capturing) return;
  clearTimeout(releaseTimer);
  releaseTimer = setTimeout(() => {
    if (talking || handsFree) return;
    capturing = false;
    send({ type: "audio.end" });
    refreshControls();
  }, PTT_TAIL_MS);
}

function setHandsFree(on) {
  handsFree = on;
  ui.handsfree.setAttribute("aria-pressed", String(on));
  ui.handsfree.textContent = on ? "Hands-free: on" : "Hands-free: off";
  root.dataset.handsfree = on ? "on" : "off";
}

async function toggleHandsFree() {
  unlockAudio();
  if (handsFree) {
    setHandsFree(false);
    capturing = false;
    send({ type: "audio.end" });
    refreshControls();
    return;
  }
  setHandsFree(true);
  refreshControls();
  const ok = await micEnsure();
  if (!ok) {
    setHandsFree(false);
  } else if (handsFree) {
    startCapture({ preroll: false });
  }
  refreshControls();
}

// --- controls ---------------------------------------------------------------------------

let activityNote = "";
let activityTimer = null;

function flashActivity(text) {
  activityNote = text;
  clearTimeout(activityTimer);
  activityTimer = setTimeout(() => {
    activityNote = "";
    refreshActivity();
  }, 4000);
  refreshActivity();
}

function refreshActivity() {
  let text = activityNote;
  if (player.playing) text = `${personaName} is speaking…`;
  else if (hearing) text = "Hearing you…";
  else if (capturing) text = handsFree ? "Listening (hands-free)…" : "Listening…";
  ui.activity.textContent = text;
  root.dataset.speaking = player.playing ? "yes" : "no";
  refreshControls();
}

function refreshControls() {
  ui.stop.disabled = !replyInProgress();
  ui.talk.setAttribute("aria-pressed", String(talking));
  ui.talk.textContent = talking ? "Talking… release to send" : "Hold to talk";
  ui.talk.disabled = handsFree || stopped;
  ui.handsfree.disabled = stopped;
  root.dataset.capturing = capturing ? "yes" : "no";
}

function isTypingTarget(target) {
  if (!(target instanceof Element)) return false;
  if (target === ui.talk) return false;
  return Boolean(target.closest("input, textarea, select, button, a, [contenteditable]"));
}

ui.talk.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  ui.talk.setPointerCapture(event.pointerId);
  talkStart();
});
for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
  ui.talk.addEventListener(type, () => talkEnd());
}
ui.talk.addEventListener("contextmenu", (event) => event.preventDefault());
ui.talk.addEventListener("click", (event) => event.preventDefault());

document.addEventListener("keydown", (event) => {
  if (event.code !== "Space" || isTypingTarget(event.target)) return;
  event.preventDefault(); // no page scroll, no button click
  if (!event.repeat) talkStart();
});
document.addEventListener("keyup", (event) => {
  if (event.code !== "Space" || !talking) return;
  event.preventDefault();
  talkEnd();
});
window.addEventListener("blur", () => talkEnd());

ui.handsfree.addEventListener("click", () => toggleHandsFree());

ui.stop.addEventListener("click", () => {
  stopPlayback({ tellServer: true });
  refreshActivity();
});

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  unlockAudio();
  const text = ui.input.value.trim();
  if (!text) return;
  if (!live) {
    showError("Not connected, so the message was not sent. It is still in the box: send it again once the status says Live.", "connection");
    return;
  }
  if (player.playing) stopPlayback({ tellServer: false }); // the server interrupts on text
  send({ type: "text", text });
  ui.input.value = "";
});

ui.latencyToggle.addEventListener("click", () => setLatencyVisible(ui.latency.hidden));
try {
  setLatencyVisible(localStorage.getItem("parley.latency") === "1");
} catch {
  setLatencyVisible(false);
}

window.parley = {
  get socket() {
    return ws;
  },
  get state() {
    return ui.status.dataset.state;
  },
  get resumeFrom() {
    return contiguousSeq;
  },
  player,
  stats,
};

setHandsFree(false);
refreshControls();
connect();
