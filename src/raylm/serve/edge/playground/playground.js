// The raylm playground: chat (streamed) and embeddings against this server's OpenAI routes.
// No framework: state is the conversation, the key and one AbortController; the DOM is the rest.
// marked and DOMPurify are vendored classic scripts (window.marked, window.DOMPurify).

// Every element the page uses, looked up once at start: model output rendered later can never stand in for
// one (an answer carrying <form id="chat-form"> comes before the real form in the document).
const IDS = ["api-key", "api-key-field", "error", "tab-chat", "tab-embed", "chat-panel", "embed-panel", "model",
  "system", "temperature", "max-tokens", "tools", "tool-choice", "new-chat", "messages", "chat-form", "prompt",
  "send", "stop",
  "embed-model", "embed-run", "embed-input", "embed-matrix"];
const dom = {};
const $ = (id) => dom[id];
const KEY_STORAGE = "raylm.apiKey"; // sessionStorage only: the key leaves with the tab

const state = {
  history: [],        // the conversation sent with each turn: {role, content}
  controller: null,   // the running chat request's AbortController
};

// ---------- Markdown ----------

// Model output may carry any HTML: no form controls (a <form> could submit, an <input> take keystrokes), and
// ids and names prefixed (SANITIZE_NAMED_PROPS) so that none can shadow the page's own.
const PURIFY = {
  FORBID_TAGS: ["form", "input", "button", "textarea", "select", "option", "dialog", "style"],
  FORBID_ATTR: ["style"], // would only trip the CSP (style-src 'self'); dropped rather than logged
  SANITIZE_NAMED_PROPS: true,
};

/** Model output → safe HTML: Markdown by marked, then DOMPurify removes scripts, handlers and the like. */
function render(markdown) {
  const html = window.marked.parse(markdown, { gfm: true, breaks: true });
  return window.DOMPurify.sanitize(html, PURIFY);
}

// ---------- HTTP ----------

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** A failed response as an Error carrying the OpenAI error body's message. */
async function apiError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const { error } = await response.json();
    message = error.message || message;
  } catch {
    // not the OpenAI error shape (a proxy's page, say): the status is all we have
  }
  if (response.status === 401) {
    $("api-key-field").hidden = false;
    message = `This server needs an API key: enter yours in the API key field above. (${message})`;
  }
  return new Error(message);
}

async function api(path, body, signal) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (!response.ok) throw await apiError(response);
  return response;
}

/** The JSON payloads of an SSE body (`data: …` lines) up to `data: [DONE]`. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the stream ended before [DONE]: the connection was cut");
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") {
        reader.cancel();
        return;
      }
      yield JSON.parse(data);
    }
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---------- Models ----------

function fillSelect(select, models) {
  const previous = select.value;
  // A LoRA adapter's card names its base model in `parent` (as vLLM's does)
  select.replaceChildren(...models.map((m) => new Option(m.parent ? `${m.id} (LoRA of ${m.parent})` : m.id, m.id)));
  if (models.some((m) => m.id === previous)) select.value = previous;
}

let modelsAsked = 0;

async function loadModels() {
  const asked = ++modelsAsked; // an older answer (the previous key's) must not overwrite a newer one
  try {
    const { data } = await (await api("v1/models")).json();
    if (asked !== modelsAsked) return;
    // `task` is raylm's extension; a server without it serves chat models
    fillSelect($("model"), data.filter((m) => (m.task ?? "generate") === "generate"));
    fillSelect($("embed-model"), data.filter((m) => m.task === "embed"));
    showError("");
  } catch (err) {
    if (asked !== modelsAsked) return;
    fillSelect($("model"), []);
    fillSelect($("embed-model"), []);
    showError(err.message);
  }
}

let keyTimer = null;

function onKeyInput() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadModels, 300); // once typing pauses, not per keystroke
}

// ---------- Chat ----------

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function addMessage(role, text) {
  const item = document.createElement("article");
  item.className = `message ${role}`;
  // The model's reasoning (collapsed), its answer, the tools it called, the figures: parts stay empty and
  // hidden until a stream fills them.
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  reasoning.append(Object.assign(document.createElement("summary"), { textContent: "Reasoning" }),
    document.createElement("pre"));
  const content = document.createElement("div");
  content.className = "content";
  const calls = document.createElement("div");
  calls.className = "tool-calls";
  const stats = document.createElement("div");
  stats.className = "stats";
  item.append(reasoning, content, calls, stats);
  if (role === "user") content.textContent = text; // the user's own text is shown as typed
  $("messages").append(item);
  scrollToEnd();
  return item;
}

/** Re-renders an answer at most once per frame: tokens come faster than a page needs to repaint. */
function renderer(item) {
  const content = item.querySelector(".content");
  let text = "";
  let pending = false;
  const paint = () => {
    pending = false;
    content.innerHTML = render(text);
    scrollToEnd();
  };
  return {
    item,
    set(value) {
      text = value;
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    },
    flush: paint, // the final text, now (rAF does not run in a hidden tab)
  };
}

function setBusy(controller) {
  state.controller = controller;
  $("send").disabled = controller !== null;
  $("stop").disabled = controller === null;
}

/** Tool calls as streamed: each its name and arguments, shown as text (never rendered as HTML). */
function showToolCalls(item, calls) {
  const list = item.querySelector(".tool-calls");
  list.replaceChildren(...calls.filter(Boolean).map((call) => {
    const block = document.createElement("pre");
    block.className = "tool-call";
    let args = call.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // still streaming, or not JSON: shown as it came
    }
    block.textContent = `${call.name}(${args})`;
    return block;
  }));
}

function showReasoning(item, text) {
  const reasoning = item.querySelector(".reasoning");
  reasoning.hidden = !text;
  reasoning.querySelector("pre").textContent = text;
}

/** The tools field's JSON (an array), or null when empty; a SyntaxError names the problem. */
function parseTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const tools = JSON.parse(text);
  if (!Array.isArray(tools)) throw new SyntaxError("Tools must be a JSON array of OpenAI tool objects.");
  return tools;
}

function chatRequest(model, history) {
  const system = $("system").value.trim();
  const body = {
    model,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
    stream: true,
    stream_options: { include_usage: true },
  };
  // empty = not sent: the server's own default applies (greedy for the bundled model)
  const temperature = $("temperature").value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const tools = parseTools();
  if (tools) Object.assign(body, { tools, tool_choice: $("tool-choice").value });
  return body;
}

const OUTCOMES = { stopped: "stopped", error: "failed" };

/** TTFT: send to first token (queueing and prefill); tok/s: the decode rate after it. Tokens are the
 * server's count (usage) when the stream got that far, else the chunks seen. */
function showStats(item, { started, first, ended, chunks, usage, finish }) {
  const tokens = usage?.completion_tokens ?? chunks;
  const parts = [];
  if (first !== null) {
    const ttft = Math.round(first - started);
    item.dataset.ttftMs = String(ttft);
    parts.push(`TTFT ${ttft} ms`);
    const seconds = (ended - first) / 1000;
    if (tokens > 1 && seconds > 0) {
      const rate = (tokens - 1) / seconds;
      item.dataset.tokPerS = rate.toFixed(1);
      parts.push(`${rate.toFixed(1)} tok/s`);
    }
  }
  parts.push(`${tokens} tokens`);
  const outcome = OUTCOMES[item.dataset.state] ?? (finish === "length" ? "cut at max tokens" : null);
  if (outcome) parts.push(outcome);
  item.querySelector(".stats").textContent = parts.join(" · ");
}

/** Reads a chat stream into `view`, keeping what the stats need in `got` (kept, too, when stopped). */
async function readAnswer(response, view, got) {
  for await (const chunk of sseData(response.body)) {
    if (chunk.error) throw new Error(chunk.error.message); // the server's one event after a failure
    if (chunk.usage) got.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (choice?.finish_reason) got.finish = choice.finish_reason;
    const delta = choice?.delta ?? {};
    if (delta.content || delta.reasoning || delta.reasoning_content || delta.tool_calls?.length) {
      got.first ??= performance.now();
      got.chunks += 1;
    }
    if (delta.content) {
      got.text += delta.content;
      view.set(got.text);
    }
    const reasoning = delta.reasoning ?? delta.reasoning_content; // vLLM 0.32's name, then the older one
    if (reasoning) {
      got.reasoning += reasoning;
      showReasoning(view.item, got.reasoning);
    }
    for (const call of delta.tool_calls ?? []) { // the id and name first, then the arguments in pieces
      const entry = (got.calls[call.index ?? 0] ??= { name: "", arguments: "" });
      entry.name += call.function?.name ?? "";
      entry.arguments += call.function?.arguments ?? "";
      showToolCalls(view.item, got.calls);
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const model = $("model").value;
  if (!text || state.controller) return;
  if (!model) return showError("No chat model to send to: the server lists none (or needs an API key).");
  showError("");
  $("prompt").value = "";
  const history = state.history; // "New chat" swaps in a new one; this turn belongs to the old
  history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const item = addMessage("assistant", "");
  item.dataset.model = model;
  item.dataset.state = "streaming";
  const view = renderer(item);
  const controller = new AbortController();
  setBusy(controller);
  const got = { started: performance.now(), first: null, text: "", reasoning: "", calls: [], chunks: 0,
    usage: null, finish: null };
  try {
    const body = chatRequest(model, history); // a tools field that is not JSON fails here, before sending
    await readAnswer(await api("v1/chat/completions", body, controller.signal), view, got);
    item.dataset.state = "done";
  } catch (err) {
    item.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    if (item.dataset.state === "error") showError(err.message);
  }
  got.ended = performance.now();
  setBusy(null);
  if (got.text || got.calls.length || item.dataset.state === "done") {
    // a stopped or cut answer stays: the user saw it, so the next turn builds on it (its text: the page
    // runs no tools, so a call has no result to send back)
    view.flush();
    history.push({ role: "assistant", content: got.text });
    item.classList.toggle("stopped", item.dataset.state === "stopped");
    showStats(item, got);
  } else if (history === state.history) {
    // nothing came back: forget the turn and give the prompt back, to retry
    history.pop();
    asked.remove();
    item.remove();
    $("prompt").value = text;
  }
}

function newChat() {
  state.controller?.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
}

// ---------- Embeddings ----------

function normalize(vector) {
  const norm = Math.sqrt(vector.reduce((sum, x) => sum + x * x, 0)) || 1;
  return vector.map((x) => x / norm);
}

function similarityTable(lines, vectors) {
  const table = $("embed-matrix");
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  lines.forEach((_, i) => {
    const th = document.createElement("th");
    th.textContent = String(i + 1);
    head.append(th);
  });
  const body = table.createTBody();
  vectors.forEach((a, i) => {
    const row = body.insertRow();
    const label = document.createElement("th");
    label.textContent = `${i + 1}. ${lines[i]}`;
    label.title = lines[i];
    row.append(label);
    vectors.forEach((b) => {
      const sim = a.reduce((sum, x, k) => sum + x * b[k], 0);
      const cell = row.insertCell();
      cell.textContent = sim.toFixed(2);
      cell.dataset.level = String(Math.max(0, Math.min(4, Math.floor(sim * 5)))); // the colour band
    });
  });
}

async function runEmbeddings() {
  const lines = $("embed-input").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const model = $("embed-model").value;
  $("embed-matrix").replaceChildren();
  if (!model) return showError("No embedding model: the server lists none (or needs an API key).");
  if (!lines.length) return showError("Enter at least one line.");
  showError("");
  $("embed-run").disabled = true;
  try {
    const { data } = await (await api("v1/embeddings", { model, input: lines })).json();
    const vectors = data.sort((a, b) => a.index - b.index).map((d) => normalize(d.embedding));
    similarityTable(lines, vectors);
  } catch (err) {
    showError(err.message);
  } finally {
    $("embed-run").disabled = false;
  }
}

// ---------- Wiring ----------

function selectTab(name) {
  for (const tab of ["chat", "embed"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`${tab}-panel`).hidden = tab !== name;
  }
}

function start() {
  for (const id of IDS) dom[id] = document.getElementById(id);
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) {
    $("api-key").value = key;
    $("api-key-field").hidden = false;
  }
  $("api-key").addEventListener("input", onKeyInput);
  $("tab-chat").addEventListener("click", () => selectTab("chat"));
  $("tab-embed").addEventListener("click", () => selectTab("embed"));
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing) return;
    e.preventDefault();
    $("chat-form").requestSubmit();
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("embed-run").addEventListener("click", runEmbeddings);
  loadModels();
}

/** An answer shown as if a model had streamed it (tests and the console): the page's own render path. */
function show(markdown) {
  const item = addMessage("assistant", "");
  item.dataset.state = "done";
  const view = renderer(item);
  view.set(markdown);
  view.flush();
  return item;
}

// For tests and the console: the sanitizer path, callable on its own.
window.raylmPlayground = { render, show };
start();
