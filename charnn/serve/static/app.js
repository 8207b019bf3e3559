// charnn serve's page: generate (streamed from POST /v1/completions) and score (POST /v1/score,
// each token coloured by its surprisal). Plain JS, no dependencies, nothing fetched from elsewhere.
// The forms are novalidate: the server owns the limits, and its message is what the page shows.
"use strict";

// Surprisal (bits) -> background, the terminal's scale: charnn/cli/score.py's HEAT (a test
// compares the two). [upper limit, background, text colour for contrast]; null: no colour.
const HEAT = [
  [1, null, null],
  [2, "#3a3a00", "#ffffff"],
  [4, "#5f5f00", "#ffffff"],
  [6, "#875f00", "#ffffff"],
  [8, "#af5f00", "#ffffff"],
  [11, "#d75f00", "#000000"],
  [Infinity, "#ff0000", "#000000"],
];
const KEY_STORE = "charnn.apiKey";
const $ = (id) => document.getElementById(id);

let level = "char";  // the model's vocabulary level: word tokens are shown with spaces between
let running = null;  // the AbortController of the generation in flight

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message ? message.split("\n")[0] : "";
}

// One line from an error response: the API's {"error": {"message"}} or the status.
async function apiError(resp) {
  let message = "";
  try {
    const body = await resp.json();
    message = body && body.error && body.error.message;
  } catch (e) { /* not JSON */ }
  return `${resp.status} ${resp.statusText || "error"}${message ? ": " + message : ""}`;
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value)) throw new Error(`${$(id).labels[0].textContent}: not a number`);
  return value;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", {headers: headers()});
    if (!resp.ok) {
      $("model").textContent = "";
      const asked = resp.status === 401 && !$("api-key").value.trim();
      showError(asked ? "this server needs an API key: enter it above" : await apiError(resp));
      return;
    }
    const model = (await resp.json()).data[0];
    $("model").textContent = model.id;
    const vocab = model.charnn && model.charnn.vocab;
    if (vocab && vocab.level) level = vocab.level;
    showError("");
  } catch (e) {
    showError("cannot reach the server: " + e.message);
  }
}

// Server-sent events from a fetch body: calls onData with each event's data (its data: lines
// joined by newlines); stops at the end of the body or when onData returns true.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data)) {
        await reader.cancel();
        return;
      }
    }
  }
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  let request;
  try {
    request = {
      prompt: $("prompt").value,
      temperature: numberField("temperature", parseFloat),
      top_p: numberField("top-p", parseFloat),
      max_tokens: numberField("max-tokens", (s) => parseInt(s, 10)),
      seed: numberField("seed", (s) => parseInt(s, 10)),
      stream: true,
      stream_options: {include_usage: true},  // a last event with the token count
    };
  } catch (e) {
    showError(e.message);
    return;
  }
  const out = $("output-text");
  $("output-prompt").textContent = request.prompt;
  out.textContent = "";
  running = new AbortController();
  setRunning(true);
  $("generate-status").textContent = "generating…";
  let tokens = null, finish = null;
  const started = performance.now();
  try {
    const resp = await fetch("/v1/completions",
      {method: "POST", headers: headers(), body: JSON.stringify(request), signal: running.signal});
    if (!resp.ok) throw new Error(await apiError(resp));
    await readEvents(resp.body, (data) => {
      if (data === "[DONE]") return true;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {  // the last event: no choices, the usage
        tokens = chunk.usage.completion_tokens;
        return false;
      }
      // An event holds one token, or several when the page reads slower than the server writes.
      const choice = chunk.choices[0];
      out.append(choice.text);
      if (choice.finish_reason) finish = choice.finish_reason;
      return false;
    });
    const seconds = (performance.now() - started) / 1000;
    $("generate-status").textContent = `${tokens === null ? "done" : tokens + " tokens"} in ${seconds.toFixed(1)} s` +
      (finish === "stop" ? ", ended at a stop string" : finish === "length" ? ", length reached" : "");
  } catch (e) {
    if (e.name === "AbortError") {
      $("generate-status").textContent = `stopped after ${out.textContent.length.toLocaleString()} characters`;
    } else {
      $("generate-status").textContent = "";
      showError(e.message);
    }
  } finally {
    running = null;
    setRunning(false);
  }
}

function setRunning(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("output").setAttribute("aria-busy", on ? "true" : "false");
}

function heatOf(bits) {
  return HEAT.find(([limit]) => bits < limit);
}

function fixed(x, digits) {
  return Number(x).toFixed(digits);
}

async function score(event) {
  event.preventDefault();
  showError("");
  const heat = $("heat"), table = $("score-table"), rows = table.tBodies[0];
  $("score").disabled = true;
  $("score-status").textContent = "scoring…";
  try {
    const resp = await fetch("/v1/score",
      {method: "POST", headers: headers(), body: JSON.stringify({input: $("score-input").value, tokens: true})});
    if (!resp.ok) throw new Error(await apiError(resp));
    const result = await resp.json();
    heat.replaceChildren();
    rows.replaceChildren();
    for (const line of result.data) {
      const p = document.createElement("p");
      p.className = "line";
      line.token_surprisal_bits.forEach(([token, bits], i) => {
        if (level === "word" && i) p.append(" ");
        const span = document.createElement("span");
        const [, background, colour] = heatOf(bits);
        span.className = "tok";
        span.textContent = token === "\n" || token === "<eos>" ? "⏎" : token;
        span.dataset.bits = bits;
        span.title = `${JSON.stringify(token)}: ${fixed(bits, 2)} bits`;
        if (background) {
          span.style.backgroundColor = background;
          span.style.color = colour;
        }
        p.append(span);
      });
      const numbers = document.createElement("span");
      numbers.className = "numbers";
      numbers.textContent = `${line.tokens} tokens, ${fixed(line.logprob, 2)} nats, ` +
        `${fixed(line.bits_per_token, 3)} bits/token`;
      p.append(numbers);
      heat.append(p);
      const tr = rows.insertRow();
      for (const cell of [line.index, line.tokens, fixed(line.logprob, 2), fixed(line.nats_per_token, 3),
                          fixed(line.bits_per_token, 3), fixed(line.perplexity, 2), line.text]) {
        tr.insertCell().textContent = cell;
      }
    }
    const s = result.summary;
    if (result.data.length > 1) {
      const tr = rows.insertRow();
      tr.className = "all";
      for (const cell of ["all", s.tokens, fixed(s.logprob, 2), fixed(s.nats_per_token, 3),
                          fixed(s.bits_per_token, 3), fixed(s.perplexity, 2), `${s.lines} lines`]) {
        tr.insertCell().textContent = cell;
      }
    }
    table.hidden = result.data.length === 0;
    $("score-status").textContent = result.data.length ? "" : "no line to score (blank lines are skipped)";
    if (s.excluded) $("score-status").textContent =
      `${s.excluded} character${s.excluded === 1 ? "" : "s"} not in the model's vocabulary left out`;
  } catch (e) {
    $("score-status").textContent = "";
    showError(e.message);
  } finally {
    $("score").disabled = false;
  }
}

function legend() {
  const el = $("legend");
  el.append("surprisal: ");
  let low = 0;
  for (const [limit, background, colour] of HEAT) {
    const span = document.createElement("span");
    span.className = "swatch";
    span.textContent = limit === Infinity ? `≥ ${low} bits` : low === 0 ? `< ${limit} bit` : `${low}–${limit}`;
    if (background) {
      span.style.backgroundColor = background;
      span.style.color = colour;
    }
    el.append(span, " ");
    low = limit;
  }
}

function selectView(name) {
  for (const view of ["generate", "score"]) {
    const on = view === name;
    const tab = $("tab-" + view);
    tab.setAttribute("aria-selected", on ? "true" : "false");
    tab.tabIndex = on ? 0 : -1;
    $("view-" + view).hidden = !on;
  }
}

function setup() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => e.preventDefault());
  key.addEventListener("change", () => {
    const value = key.value.trim();
    if (value) localStorage.setItem(KEY_STORE, value); else localStorage.removeItem(KEY_STORE);
    loadModel();
  });
  $("generate-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("score-form").addEventListener("submit", score);
  for (const [area, form] of [["prompt", "generate-form"], ["score-input", "score-form"]]) {
    $(area).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        $(form).requestSubmit();
      }
    });
  }
  const tabs = ["generate", "score"];
  tabs.forEach((view, i) => {
    const tab = $("tab-" + view);
    tab.addEventListener("click", () => selectView(view));
    tab.addEventListener("keydown", (e) => {  // arrow keys move between tabs, as WAI-ARIA's tabs do
      if (e.key !== "ArrowRight" && e.key !== "ArrowLeft") return;
      const next = tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
      selectView(next);
      $("tab-" + next).focus();
    });
  });
  legend();
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
