// The chat page's behaviour: every call goes to this edge's own API with the user's key.
// Text from the API is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "ragline.apiKey";
const COLLECTION = "ragline.collection";
const TURNS_KEPT = 6; // earlier messages sent as history (the edge bounds them too)
let history = []; // this conversation's earlier turns: {role, content}, oldest first

function newConversation() {
  history = [];
  $("conversation").replaceChildren();
  $("new-conversation").hidden = true;
}

function remember(query, answer) {
  history = [...history, { role: "user", content: query }, { role: "assistant", content: answer }];
  history = history.slice(-TURNS_KEPT);
  const turn = document.createElement("li");
  turn.textContent = query;
  $("conversation").append(turn);
  $("new-conversation").hidden = false;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function explain(err) {
  if (err.status === 401) {
    $("api-key").focus();
    return "This edge needs an API key: enter yours above and press 'Use key'.";
  }
  if (err.status === 403) return `This key may not do that: ${err.message}`;
  if (err.status === 429) return "The edge is busy right now: try again in a moment.";
  return err.message || String(err);
}

// fetch() against the edge with the key; a non-2xx answer throws an ApiError.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = localStorage.getItem(KEY);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let body = {};
    try {
      body = await response.json();
    } catch (_) {
      // not JSON (a proxy's page): the status line says enough
    }
    const error = body.error || {};
    throw new ApiError(response.status, error.code, error.message || response.statusText);
  }
  return response;
}

const postJson = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

// --- knowledge bases and documents ---------------------------------------------------------

async function loadCollections() {
  const { collections } = await (await api("/collections")).json();
  const select = $("collection");
  const stored = localStorage.getItem(COLLECTION);
  const chosen = collections.some((c) => c.name === stored) ? stored : collections.find((c) => c.default)?.name;
  select.replaceChildren(
    ...collections.map((c) => {
      const count = c.documents === 1 ? "1 document" : `${c.documents ?? "?"} documents`;
      const option = new Option(`${c.name} (${count})`, c.name);
      option.selected = c.name === chosen;
      return option;
    }),
  );
  if (!collections.length) notice("No knowledge base yet: create one on the right, then upload.");
  await loadDocuments();
}

async function loadDocuments() {
  const name = $("collection").value;
  const list = $("documents");
  if (!name) return list.replaceChildren();
  const path = `/collections/${encodeURIComponent(name)}/documents?limit=1000`;
  const { documents } = await (await api(path)).json();
  list.replaceChildren(
    ...documents.map((d) => {
      const item = document.createElement("li");
      item.textContent = d.source || d.id;
      item.title = `${d.chunks} chunks, ingested ${d.ingested_at || "?"}`;
      return item;
    }),
  );
}

async function upload(event) {
  event.preventDefault();
  const file = $("file").files[0];
  const name = $("collection").value;
  if (!name) return ($("upload-result").textContent = "Create a knowledge base first.");
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  $("upload").disabled = true;
  $("upload-result").textContent = `Uploading ${file.name}…`;
  try {
    const path = `/collections/${encodeURIComponent(name)}/documents`;
    const done = await (await api(path, { method: "POST", body: form })).json();
    $("upload-result").textContent = `${done.document_id}: ${done.status}, ${done.chunks} chunks`;
    $("file").value = "";
    await loadCollections();
  } catch (err) {
    $("upload-result").textContent = `Upload failed: ${explain(err)}`;
  } finally {
    $("upload").disabled = false;
  }
}

async function createCollection(event) {
  event.preventDefault();
  const name = $("new-collection").value.trim();
  try {
    await postJson("/collections", { name });
    localStorage.setItem(COLLECTION, name);
    $("new-collection").value = "";
    notice("");
    await loadCollections();
  } catch (err) {
    notice(explain(err));
  }
}

// --- asking --------------------------------------------------------------------------------

// Server-Sent Events from a POST (EventSource only GETs): yields {event, data} per message.
async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function sourceName(passage) {
  return (passage.metadata && passage.metadata.source) || passage.id.replace(/#\d+$/, "");
}

function showSources(passages, title = "Passages") {
  $("sources-title").textContent = title;
  $("sources-title").hidden = !passages.length;
  $("sources").replaceChildren(
    ...passages.map((p) => {
      const item = document.createElement("li");
      item.dataset.id = p.id;
      const head = document.createElement("div");
      head.className = "source";
      head.textContent = `${sourceName(p)} · ${Number(p.score).toFixed(2)}`;
      const text = document.createElement("p");
      text.textContent = p.text.length > 400 ? `${p.text.slice(0, 400)}…` : p.text;
      item.append(head, text);
      return item;
    }),
  );
}

function markCitations(citations) {
  const cited = new Set((citations || []).map((c) => c.id));
  for (const item of $("sources").children) item.classList.toggle("cited", cited.has(item.dataset.id));
}

async function ask(event) {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) return;
  const answer = $("answer");
  answer.textContent = "";
  answer.className = "answer streaming";
  $("answer-note").textContent = "";
  showSources([]);
  notice("");
  $("ask").disabled = true;
  try {
    const body = { query, collection: $("collection").value || undefined, stream: true, history };
    const response = await postJson("/chat", body);
    for await (const { event, data } of sse(response)) {
      if (event === "sources") showSources(data);
      else if (event === "token") answer.textContent += data.text;
      else if (event === "replace") {
        answer.textContent = data.answer;
        showSources(data.sources);
        markCitations(data.citations);
        $("answer-note").textContent = "The streamed text failed the grounding check; this is the checked answer.";
      } else if (event === "done") {
        finish(data);
        remember(query, answer.textContent);
      } else if (event === "error") throw new ApiError(0, data.code, data.message);
    }
  } catch (err) {
    notice(explain(err));
  } finally {
    answer.classList.remove("streaming");
    $("ask").disabled = false;
  }
}

function finish(done) {
  const answer = $("answer");
  if (done.not_found) {
    answer.classList.add("not-found");
    showSources(done.closest || [], "Closest passages (none holds the answer)");
  } else {
    markCitations(done.citations);
  }
  const total = done.timings_ms && done.timings_ms.total;
  const followUp = done.search_query && done.search_query.includes("\n");
  const parts = [
    followUp ? "follow-up: searched with the earlier question" : "",
    done.cached ? "from the cache" : "",
    total ? `${Math.round(total)} ms` : "",
  ];
  const note = $("answer-note");
  note.textContent = [note.textContent, ...parts].filter(Boolean).join(" · ");
}

// --- start ---------------------------------------------------------------------------------

async function refresh() {
  try {
    notice("");
    await loadCollections();
  } catch (err) {
    notice(explain(err));
  }
}

$("api-key").value = localStorage.getItem(KEY) || "";
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
  refresh();
});
$("collection").addEventListener("change", () => {
  localStorage.setItem(COLLECTION, $("collection").value);
  newConversation(); // a follow-up is about the same knowledge base
  loadDocuments().catch((err) => notice(explain(err)));
});
$("ask-form").addEventListener("submit", ask);
$("new-conversation").addEventListener("click", newConversation);
$("query").addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.shiftKey) return;
  event.preventDefault(); // Enter asks; Shift+Enter is a new line
  $("ask-form").requestSubmit();
});
$("upload-form").addEventListener("submit", upload);
$("new-collection-form").addEventListener("submit", createCollection);
refresh();
