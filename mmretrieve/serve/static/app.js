// The search page: text or image queries against the JSON API, results as a grid of thumbnails.
// Everything shown from the index (paths, captions) goes in through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_COOKIE = "mmretrieve_api_key";
let lastRequest = null;  // repeated after an API key is entered

function setStatus(text, isError = false, preview = null) {
  const status = $("status");
  status.replaceChildren();
  status.classList.toggle("error", isError);
  if (preview) {
    const img = document.createElement("img");
    img.src = preview;
    img.alt = "query image";
    status.append(img);
  }
  status.append(document.createTextNode(text));
}

function baseName(path) {
  return (path || "").split(/[\\/]/).pop();
}

function card(hit) {
  const link = document.createElement(hit.file_url ? "a" : "div");
  link.className = "card";
  if (hit.file_url) {
    link.href = hit.file_url;
    link.target = "_blank";
    link.rel = "noopener";
    link.title = hit.path;
  }
  const frame = document.createElement("div");
  frame.className = "thumb";
  if (hit.thumbnail_url) {
    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    img.alt = hit.text || baseName(hit.path);
    img.loading = "lazy";
    img.decoding = "async";
    frame.append(img);
  }
  link.append(frame);
  if (hit.text) {
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.text;
    link.append(caption);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = `${hit.rank}. ${baseName(hit.path)}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(name, score);
  link.append(meta);
  return link;
}

async function run(request, label, preview = null) {
  lastRequest = { request, label, preview };
  setStatus(`Searching for ${label}…`, false, preview);
  let response;
  try {
    response = await request();
  } catch (err) {
    setStatus(`The server could not be reached (${err.message}).`, true, preview);
    return;
  }
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) {
    $("key").hidden = false;
    $("key-value").focus();
    setStatus("This server needs an API key.", true);
    return;
  }
  if (!response.ok) {
    setStatus(body.error || `HTTP ${response.status}`, true, preview);
    return;
  }
  $("results").replaceChildren(...body.results.map(card));
  const what = body.index === "texts" ? "captions" : "photos";
  setStatus(`${body.results.length} ${what} for ${label} in ${body.took_ms} ms`, false, preview);
}

function searchText(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  if (!q) {
    setStatus("Type something to search for.", true);
    return;
  }
  const params = new URLSearchParams({ q, k: $("k").value, index: $("index").value });
  history.replaceState(null, "", `?${params}`);
  run(() => fetch(`api/search?${params}`), `“${q}”`);
}

function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  const params = new URLSearchParams({ k: $("k").value, index: $("index").value });
  // Words in the box refine the image ("like this, but at night"): one fused query.
  const words = $("q").value.trim();
  if (words) params.set("text", words);
  const preview = URL.createObjectURL(file);
  const label = words ? `this image + “${words}”` : "this image";
  run(() => fetch(`api/search/image?${params}`, { method: "POST", body: form }), label, preview);
}

function useKey(event) {
  event.preventDefault();
  const key = $("key-value").value;
  // A cookie, because <img> and <a> requests cannot carry an X-API-Key header.
  document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
  $("key").hidden = true;
  if (lastRequest) run(lastRequest.request, lastRequest.label, lastRequest.preview);
}

async function showInfo() {
  try {
    const health = await (await fetch("health")).json();
    const parts = Object.entries(health.indexes || {}).map(([name, s]) => `${s.items} ${name === "texts" ? "captions" : "photos"}`);
    $("info").textContent = `${parts.join(", ")} · model ${baseName(health.model.ref)} · mmretrieve ${health.version}`;
    if (health.indexes && health.indexes.texts) $("index").querySelector('[value="texts"]').hidden = false;
  } catch (err) {
    $("info").textContent = "";
  }
}

function init() {
  $("search").addEventListener("submit", searchText);
  $("key").addEventListener("submit", useKey);
  $("upload").addEventListener("change", (e) => searchImage(e.target.files[0]));
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dropping"); });
  document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dropping");
    searchImage(e.dataTransfer.files[0]);
  });
  const params = new URLSearchParams(location.search);
  if (params.get("k")) $("k").value = params.get("k");
  showInfo().then(() => {
    if (params.get("index")) $("index").value = params.get("index");
    if (params.get("q")) {
      $("q").value = params.get("q");
      searchText();
    }
  });
}

init();
