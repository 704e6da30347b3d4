// The SONAR-LLM playground: plain browser JavaScript, no build step, nothing from a CDN.
// It speaks the server's own API: /generate and /summarize as Server-Sent Events, /embed for the
// similarity map, /v1/languages for the pickers, /info and /metrics for the status corner.
"use strict";

const KEY_STORE = "sonar-llm-api-key";
const EOS_TEXT = "End of sequence.";
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);

const state = {
  languages: new Map(), // code -> English name
  byName: new Map(), // lower-case name -> code
  controller: null, // the running request's AbortController
  eos: null, // Promise of the EOS text's embedding, fetched once
  eosValue: null, // ...and the embedding once it came
  history: [], // chat turns, user and model alternating
  prompt: [], // {text, embedding} of the last request's prompt sentences
  generated: [], // {text, embedding} of the sentences received so far
  eosThreshold: 0.98,
  loadError: null, // why the languages or /info did not load (shown instead of a stale hint)
};

// ----- HTTP -------------------------------------------------------------------------------
function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  if (response.status === 401) {
    return apiKey()
      ? "The server refused this API key: check the API key field."
      : "This server needs an API key: enter it in the API key field and save it.";
  }
  let message = `${response.status} ${response.statusText}`;
  try {
    const { error } = await response.json();
    if (error && error.message) {
      // Validation messages already start with the field's name: never "seed: seed: ...".
      const named = !error.param || error.message.startsWith(`${error.param}:`);
      message = named ? error.message : `${error.param}: ${error.message}`;
    }
  } catch {
    // not the error envelope: keep the status line
  }
  return message;
}

async function api(path, body, signal) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    const error = new Error(await errorOf(response));
    error.status = response.status;
    throw error;
  }
  return response;
}

async function embed(texts, lang) {
  const response = await api("/embed", { texts, lang });
  return (await response.json()).embeddings;
}

// Server-Sent Events from a fetch body: yields {event, data} per event; comments are skipped.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? "" : line.slice(colon + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (field === "event") event = v;
        else if (field === "data") data.push(v);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// ----- messages and status ----------------------------------------------------------------
function say(text, kind = "") {
  const m = $("message");
  m.textContent = text;
  m.className = kind;
}

function metricValue(text, name) {
  let total = null;
  for (const line of text.split("\n")) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) {
      total = (total || 0) + Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return total;
}

async function pollMetrics() {
  try {
    const response = await fetch("/metrics"); // open even when keys are set
    if (response.ok) {
      const text = await response.text();
      for (const [id, name] of [
        ["status-running", "sonar_llm_num_requests_running"],
        ["status-waiting", "sonar_llm_num_requests_waiting"],
      ]) {
        const v = metricValue(text, name);
        $(id).textContent = v === null ? "–" : String(Math.round(v));
      }
    }
  } catch {
    // the server is away; the next poll tries again
  } finally {
    setTimeout(pollMetrics, POLL_MS);
  }
}

async function loadInfo() {
  const info = await (await api("/info")).json();
  $("status-model").textContent = info.demo ? `${info.model} (random weights)` : info.model;
  $("status-device").textContent = `${info.device}, ${info.dtype}`;
}

// ----- languages --------------------------------------------------------------------------
async function loadLanguages() {
  const { data } = await (await api("/v1/languages")).json();
  const list = $("languages");
  list.replaceChildren();
  state.languages.clear();
  state.byName.clear();
  for (const { code, name } of data) {
    state.languages.set(code, name);
    state.byName.set(name.toLowerCase(), code);
    const option = document.createElement("option");
    option.value = code;
    option.label = name;
    list.append(option);
  }
  showLanguage("source-lang");
  showLanguage("target-lang");
}

// A typed code or name (any case) -> the code, or null.
function resolveLanguage(text) {
  const t = text.trim().toLowerCase();
  if (!t) return null;
  for (const code of state.languages.keys()) if (code.toLowerCase() === t) return code;
  return state.byName.get(t) || null;
}

// While typing (`settle` false) only the hint follows; once the field changes, a name becomes
// its code.
function showLanguage(id, settle = true) {
  const input = $(id);
  const hint = $(`${id}-name`);
  if (!state.languages.size) return;
  const code = resolveLanguage(input.value);
  if (code) {
    if (settle) input.value = code;
    input.removeAttribute("aria-invalid");
    hint.textContent = state.languages.get(code);
  } else {
    input.setAttribute("aria-invalid", "true");
    hint.textContent = "not a SONAR language: type a name or code and pick from the list";
  }
}

// ----- the request ------------------------------------------------------------------------
function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestFor(text) {
  if (!state.languages.size) {
    // The pickers are empty because the languages never loaded: say why (a missing key...).
    throw new Error(state.loadError || "The server's languages are still loading; try again.");
  }
  const source = resolveLanguage($("source-lang").value);
  const target = resolveLanguage($("target-lang").value);
  if (!source || !target) throw new Error("Pick the source and target languages from the list.");
  const knobs = {
    eos_threshold: numberField("eos-threshold"),
    beam_size: numberField("beam-size"),
    max_tokens: numberField("max-tokens"),
    temperature: numberField("temperature"),
    latent_temperature: numberField("latent-temperature"),
    seed: numberField("seed"),
    source_lang: source,
    target_lang: target,
    stream: true,
    return_embeddings: true,
  };
  const n = numberField("max-sentences");
  switch (mode()) {
    case "summarize":
      return ["/summarize", { document: text, num_sentences: n, ...knobs }];
    case "chat":
      return ["/generate", { prompt: [...state.history, text], max_sentences: n, ...knobs }];
    default:
      return ["/generate", { prompt: text, max_sentences: n, ...knobs }];
  }
}

function addSentence(sentence, ms) {
  const li = document.createElement("li");
  li.dataset.arrivedMs = ms.toFixed(1);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = sentence.text;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `+${(ms / 1000).toFixed(2)} s · ${sentence.num_tokens} tokens`;
  li.append(text, " ", meta);
  $("output").append(li);
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

async function run(event) {
  event.preventDefault();
  if (state.controller) return;
  const text = $("prompt").value.trim();
  if (!text) {
    say("Write a prompt first.", "error");
    return;
  }
  let path, body;
  if (!state.languages.size) await refresh(); // a key saved since, or a server now ready
  try {
    [path, body] = requestFor(text);
  } catch (e) {
    say(e.message, "error");
    return;
  }
  $("output").replaceChildren();
  $("finish").textContent = "";
  state.prompt = [];
  state.generated = [];
  state.eosThreshold = body.eos_threshold ?? 0.98;
  drawMap();
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  say("Generating…");
  const started = performance.now();
  let done = null;
  try {
    const response = await api(path, body, controller.signal);
    for await (const { event: kind, data } of sseEvents(response.body)) {
      if (kind === "sentence") {
        const sentence = JSON.parse(data);
        addSentence(sentence, performance.now() - started);
        state.generated.push({ text: sentence.text, embedding: sentence.embedding });
        eosEmbedding().then(drawMap, () => {});
        drawMap();
      } else if (kind === "done") {
        done = JSON.parse(data);
      } else if (kind === "error") {
        throw new Error(JSON.parse(data).error.message);
      }
    }
    if (!done) throw new Error("The stream ended before the answer was complete.");
    const seconds = done.usage.total_time.toFixed(2);
    $("finish").textContent =
      `finish_reason: ${done.finish_reason} · ${done.sentences.length} sentences · ` +
      `${done.usage.decoded_tokens} tokens · ${seconds} s`;
    say(`Done: ${done.sentences.length} sentences.`);
    if (mode() === "chat") addTurns(text, done.text);
    await mapPrompt(done.prompt_sentences || [], body.source_lang);
  } catch (e) {
    if (e.name === "AbortError") {
      say(`Stopped after ${state.generated.length} sentences: the server cancelled the request.`);
      await mapPrompt(await stoppedPrompt(body), body.source_lang);
    } else {
      say(e.message, "error");
    }
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

// The prompt's sentences of a stopped request (its final event, which lists them, never came):
// a text is split as the server splits it (/segment); chat turns are sent already split.
async function stoppedPrompt(body) {
  const prompt = body.prompt ?? body.document;
  if (Array.isArray(prompt)) return prompt.map((t) => t.trim()).filter(Boolean);
  try {
    const response = await api("/segment", { text: prompt, lang: body.source_lang });
    return (await response.json()).sentences;
  } catch (e) {
    say(`The similarity map is incomplete: ${e.message}`, "error");
    return [];
  }
}

function stop() {
  if (state.controller) state.controller.abort(); // closes the connection: the server cancels
}

// ----- chat -------------------------------------------------------------------------------
function addTurns(user, reply) {
  state.history.push(user, reply);
  renderConversation();
  $("prompt").value = "";
}

function renderConversation() {
  const list = $("conversation");
  list.replaceChildren();
  state.history.forEach((turn, i) => {
    const li = document.createElement("li");
    li.className = i % 2 ? "model" : "user";
    li.textContent = `${i % 2 ? "Model" : "You"}: ${turn}`;
    list.append(li);
  });
}

function onModeChange() {
  const m = mode();
  $("conversation-box").hidden = m !== "chat";
  const n = numberField("max-sentences");
  const count = n === undefined ? "a few sentences" : n === 1 ? "one sentence" : `${n} sentences`;
  $("mode-hint").textContent = {
    generate: "The model continues the text, one sentence at a time.",
    summarize: `The text is summarised in ${count} (Max sentences; the paper's instruction).`,
    chat: "Each turn joins the conversation; the model's reply continues it.",
  }[m];
}

// ----- the similarity map -----------------------------------------------------------------
function eosEmbedding() {
  if (!state.eos) {
    state.eos = embed([EOS_TEXT], "eng_Latn").then(
      ([row]) => {
        state.eosValue = row;
        return row;
      },
      (error) => {
        state.eos = null; // try again next time
        throw error;
      },
    );
  }
  return state.eos;
}

async function mapPrompt(sentences, lang) {
  if (!sentences.length) return;
  try {
    const rows = await embed(sentences, lang);
    state.prompt = sentences.map((text, i) => ({ text, embedding: rows[i] }));
    await eosEmbedding();
  } catch (e) {
    say(`The similarity map is incomplete: ${e.message}`, "error");
  }
  drawMap();
}

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

// -1 blue, 0 white, +1 red.
function colour(v) {
  const t = Math.max(-1, Math.min(1, v));
  const a = Math.abs(t);
  const [r, g, b] = t >= 0 ? [214, 47, 39] : [33, 102, 172];
  const mix = (c) => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

let lastCells = [];

function drawMap() {
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  const rows = [
    ...state.prompt.map((s, i) => ({ label: `P${i + 1}`, ...s })),
    ...state.generated.map((s, i) => ({ label: `G${i + 1}`, ...s })),
  ].filter((s) => Array.isArray(s.embedding));
  const cssWidth = canvas.clientWidth || 560;
  const n = rows.length;
  const pad = 34;
  const cell = n ? Math.max(6, Math.min(32, Math.floor((cssWidth - pad - 110) / (n + 1.5)))) : 0;
  const cssHeight = Math.max(120, pad + n * cell + 40);
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(cssWidth * dpr);
  canvas.height = Math.round(cssHeight * dpr);
  canvas.style.height = `${cssHeight}px`;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  lastCells = [];
  if (!n) {
    ctx.fillStyle = "#666";
    ctx.fillText("Generate something to see its sentences' embeddings here.", 4, 20);
    canvas.setAttribute("aria-label", "Similarity map: nothing generated yet");
    return;
  }
  const showLabels = cell >= 14;
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const v = cosine(rows[i].embedding, rows[j].embedding);
      const x = pad + j * cell;
      const y = pad + i * cell;
      ctx.fillStyle = colour(v);
      ctx.fillRect(x, y, cell - 1, cell - 1);
      lastCells.push({ x, y, w: cell, h: cell, text: `${rows[i].label} · ${rows[j].label}: ${v.toFixed(3)}` });
    }
    if (showLabels) {
      ctx.fillStyle = "#333";
      ctx.textAlign = "right";
      ctx.fillText(rows[i].label, pad - 4, pad + i * cell + cell / 2);
      ctx.save();
      ctx.translate(pad + i * cell + cell / 2, pad - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(rows[i].label, 0, 0);
      ctx.restore();
    }
  }
  // Similarity to the EOS text: a bar per row, the threshold as a line.
  const eosX = pad + n * cell + 14;
  const barW = 90;
  ctx.textAlign = "left";
  ctx.fillStyle = "#333";
  ctx.fillText("EOS", eosX, pad - 10);
  const eos = state.eosValue;
  const toX = (v) => eosX + ((v + 1) / 2) * barW;
  for (let i = 0; i < n; i++) {
    if (!eos) break;
    const v = cosine(rows[i].embedding, eos);
    const y = pad + i * cell;
    ctx.fillStyle = "#eee";
    ctx.fillRect(eosX, y, barW, cell - 1);
    ctx.fillStyle = colour(v);
    ctx.fillRect(eosX, y, toX(v) - eosX, cell - 1);
    lastCells.push({ x: eosX, y, w: barW, h: cell, text: `${rows[i].label} · EOS: ${v.toFixed(3)}` });
  }
  if (eos) {
    const x = toX(state.eosThreshold);
    ctx.strokeStyle = "#000";
    ctx.setLineDash([3, 2]);
    ctx.beginPath();
    ctx.moveTo(x, pad - 2);
    ctx.lineTo(x, pad + n * cell);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  // The colour scale.
  const legendY = pad + n * cell + 14;
  for (let k = 0; k <= 100; k++) {
    ctx.fillStyle = colour(-1 + (2 * k) / 100);
    ctx.fillRect(pad + k * 1.5, legendY, 2, 10);
  }
  ctx.fillStyle = "#333";
  ctx.textAlign = "right";
  ctx.fillText("−1", pad - 4, legendY + 5);
  ctx.textAlign = "left";
  ctx.fillText("+1 cosine", pad + 156, legendY + 5);
  canvas.setAttribute(
    "aria-label",
    `Similarity map of ${state.prompt.length} prompt and ${state.generated.length} generated sentences`,
  );
}

function describeCell(event) {
  const box = $("map").getBoundingClientRect();
  const x = event.clientX - box.left;
  const y = event.clientY - box.top;
  const hit = lastCells.find((c) => x >= c.x && x < c.x + c.w && y >= c.y && y < c.y + c.h);
  $("map-detail").textContent = hit ? hit.text : "";
}

// ----- start ------------------------------------------------------------------------------
async function refresh() {
  const results = await Promise.allSettled([loadLanguages(), loadInfo()]);
  const failed = results.find((r) => r.status === "rejected");
  state.loadError = failed ? failed.reason.message : null;
  if (failed) {
    say(failed.reason.message, "error");
    if (failed.reason.status === 503) setTimeout(refresh, 2000); // loading or warming up
  } else if ($("message").classList.contains("error")) {
    say("");
  }
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  state.eos = null;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("run-form").addEventListener("submit", run);
  $("stop").addEventListener("click", stop);
  $("key-form").addEventListener("submit", saveKey);
  $("new-chat").addEventListener("click", () => {
    state.history = [];
    renderConversation();
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", onModeChange);
  }
  for (const id of ["source-lang", "target-lang"]) {
    $(id).addEventListener("input", () => showLanguage(id, false));
    $(id).addEventListener("change", () => showLanguage(id));
  }
  $("max-sentences").addEventListener("input", onModeChange);
  // The browser's own validation blocks a submit without a submit event: say what it found,
  // instead of leaving the last request's message up.
  $("run-form").addEventListener(
    "invalid",
    (event) => {
      const field = event.target;
      const name = field.labels && field.labels[0] ? field.labels[0].textContent.trim() : field.id;
      say(`${name}: ${field.validationMessage}`, "error");
    },
    true,
  );
  $("map").addEventListener("mousemove", describeCell);
  window.addEventListener("resize", drawMap);
  drawMap();
  refresh();
  pollMetrics();
});
