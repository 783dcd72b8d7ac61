// clipsearch search page: calls the Connect JSON API of the server that serves it.
// No framework and no build step. Metadata and ids are user data: they are only ever put on
// the page with textContent, never as HTML.
import { TOKEN_KEY, rpc, thumbnailUrl } from "./api.js";
import { addFilterRow, offerKeys, readFilters } from "./filters.js";

const PAGE = 24;            // results per "load more"
const DEBOUNCE_MS = 250;    // search-as-you-type waits this long after the last key
const ID_TAIL = 10;         // characters at the end of an id that its card always shows

const $ = (id) => document.getElementById(id);
const state = {
  collection: "", query: null, k: PAGE, maxK: 1000, shown: new Set(), seq: 0,
  blobs: [], filters: null, selected: null,
};

// ---- status, errors and sign-in -------------------------------------------------------
function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
  status.dataset.kind = kind || "info";
}

let retryTimer = null;
function handleError(err, retry) {
  if (err.code === "unauthenticated") {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(err.message);
    return;
  }
  if (err.code === "unavailable") {
    setStatus(`The server is not ready (${err.message}); retrying…`, "loading");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(retry, 2000);
    return;
  }
  setStatus(`Error (${err.code}): ${err.message}`, "error");
}

function showLogin(message) {
  $("login").hidden = false;
  $("login-error").textContent = sessionStorage.getItem("clipsearch.tried") ? message : "";
  setStatus("Sign in to search this server.", "error");
  $("token").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  sessionStorage.setItem("clipsearch.tried", "1");
  $("token").value = "";
  $("login").hidden = true;
  start();
});

// ---- collections ----------------------------------------------------------------------
async function start() {
  setStatus("Loading collections…", "loading");
  try {
    const info = await rpc("GetServerInfo", {});
    state.maxK = info.maxK || 1000;
    const banner = $("banner");
    banner.hidden = !info.randomWeights;
    banner.textContent = info.randomWeights
      ? "This server runs random weights: search results are meaningless." : "";
    const { collections = [] } = await rpc("ListCollections", {});
    $("login").hidden = true;
    fillCollections(collections);
  } catch (err) {
    handleError(err, start);
  }
}

function fillCollections(collections) {
  const select = $("collection");
  select.replaceChildren();
  const wanted = new URLSearchParams(location.search).get("collection") || state.collection;
  for (const c of collections) {
    const option = document.createElement("option");
    option.value = c.name;
    option.textContent = `${c.name} (${Number(c.count || 0).toLocaleString()})`;
    option.dataset.count = c.count || "0";
    select.append(option);
  }
  if (!collections.length) {
    setStatus("There are no collections yet. Index a folder: " +
              "clipsearch index ~/Pictures --collection photos", "empty");
    return;
  }
  select.value = collections.some((c) => c.name === wanted) ? wanted : collections[0].name;
  chooseCollection();
}

function chooseCollection() {
  const select = $("collection");
  state.collection = select.value;
  $("filter-keys").replaceChildren(); // its keys are offered again as its items are shown
  const count = Number(select.selectedOptions[0]?.dataset.count || 0);
  if (count === 0) {
    clearResults();
    setStatus(`The collection “${state.collection}” is empty.`, "empty");
    return;
  }
  if (state.query) { search(true); return; }
  clearResults();
  browse();
}

async function browse() {
  // With no query yet, show the first items so the page is never blank.
  const seq = ++state.seq;
  setStatus("Loading…", "loading");
  try {
    const reply = await rpc("ListItems", { collection: state.collection, pageSize: PAGE,
                                           filter: state.filters || undefined });
    if (seq !== state.seq) return;
    const items = reply.items || [];
    render(items.map((it) => ({ id: it.id, metadata: it.metadata })), false);
    setStatus(items.length ? "Showing some items. Type or drop an image to search."
                           : "No items match these filters.", items.length ? "" : "empty");
  } catch (err) {
    if (seq === state.seq) handleError(err, browse);
  }
}

$("collection").addEventListener("change", chooseCollection);

// ---- searching ------------------------------------------------------------------------
function setQuery(query) {
  state.query = query;
  const chip = $("query-chip");
  chip.hidden = !query || query.text !== undefined;
  if (query && query.id !== undefined) {
    $("query-label").textContent = `Like “${query.id}”`;
    $("query-image").removeAttribute("src");
  } else if (query && query.image !== undefined) {
    $("query-label").textContent = query.name || "Image";
    $("query-image").src = query.preview;
  }
}

async function search(reset) {
  if (!state.query || !state.collection) return;
  if (reset) { state.k = PAGE; clearResults(); }
  const seq = ++state.seq;
  const q = state.query;
  const body = { collection: state.collection, k: Math.min(state.k, state.maxK) };
  if (q.text !== undefined) body.text = q.text;
  if (q.image !== undefined) body.image = q.image;
  if (q.id !== undefined) body.id = q.id;
  if (state.filters) body.filter = state.filters;
  setStatus("Searching…", "loading");
  try {
    const { hits = [] } = await rpc("Search", body);
    if (seq !== state.seq) return; // a newer search has started
    const fresh = hits.filter((h) => !state.shown.has(h.id));
    render(fresh, true);
    const more = hits.length >= body.k && body.k < state.maxK;
    $("more").hidden = !more;
    setStatus(state.shown.size ? `${state.shown.size} results` : "No results.",
              state.shown.size ? "" : "empty");
  } catch (err) {
    if (seq === state.seq) handleError(err, () => search(reset));
  }
}

let debounce = null;
$("query").addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(() => {
    const text = $("query").value.trim();
    if (!text) { setQuery(null); clearResults(); browse(); return; }
    setQuery({ text });
    search(true);
  }, DEBOUNCE_MS);
});
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  clearTimeout(debounce);
  const text = $("query").value.trim();
  if (text) { setQuery({ text }); search(true); }
});
$("more").addEventListener("click", () => { state.k += PAGE; search(false); });
$("clear-query").addEventListener("click", () => {
  setQuery(null); $("query").value = ""; clearResults(); browse(); $("query").focus();
});

// ---- results --------------------------------------------------------------------------
function clearResults() {
  for (const url of state.blobs) URL.revokeObjectURL(url);
  state.blobs = [];
  state.shown = new Set();
  $("results").replaceChildren();
  $("more").hidden = true;
}

function render(hits, withScore) {
  const list = $("results");
  for (const hit of hits) {
    state.shown.add(hit.id);
    const li = document.createElement("li");
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = hit.id;
    img.loading = "lazy";
    img.decoding = "async";
    thumbnailUrl(state.collection, hit.id, state.blobs).then((url) => { if (url) img.src = url; });
    img.addEventListener("error", () => {
      const none = document.createElement("span");
      none.className = "nothumb";
      none.textContent = hit.id;
      img.replaceWith(none);
    });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.append(idLabel(hit.id));
    if (withScore) {
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = Number(hit.score || 0).toFixed(3);
      meta.append(score);
    }
    const hover = document.createElement("span");
    hover.className = "hover";
    hover.textContent = describe(hit.metadata);
    if (!hover.textContent) hover.hidden = true;
    card.append(img, meta, hover);
    card.setAttribute("aria-label", `${hit.id}${withScore ? `, score ${Number(hit.score || 0).toFixed(3)}` : ""}`);
    card.addEventListener("click", () => openDetail(hit, img));
    li.append(card);
    list.append(li);
  }
  offerKeys($("filter-keys"), hits.map((hit) => hit.metadata));
}

// A card's id, cut in the middle when it is too long (`train2…00042.jpg`): ids made from
// paths share their start, so the start gives way to the ellipsis (style.css) and the end
// stays. The title holds the whole id.
function idLabel(id) {
  const chars = [...id];
  const cut = Math.max(0, chars.length - ID_TAIL);
  const label = document.createElement("span");
  label.className = "id";
  label.title = id;
  const head = document.createElement("span");
  head.className = "head";
  head.textContent = chars.slice(0, cut).join("");
  const tail = document.createElement("span");
  tail.className = "tail";
  tail.textContent = chars.slice(cut).join("");
  label.append(head, tail);
  return label;
}

function describe(metadata) {
  return Object.entries(metadata || {})
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("\n");
}

function openDetail(hit, img) {
  state.selected = hit;
  $("detail-id").textContent = hit.id;
  $("detail-score").textContent = hit.score !== undefined ? `score ${Number(hit.score).toFixed(4)}` : "";
  if (img && img.src) $("detail-image").src = img.src; else $("detail-image").removeAttribute("src");
  $("detail-image").alt = hit.id;
  const dl = $("detail-metadata");
  dl.replaceChildren();
  for (const [k, v] of Object.entries(hit.metadata || {})) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    dl.append(dt, dd);
  }
  $("detail").hidden = false;
  $("more-like-this").focus();
}

function closeDetail() {
  $("detail").hidden = true;
  const card = state.selected && [...document.querySelectorAll(".card")]
    .find((c) => c.dataset.id === state.selected.id);
  if (card) card.focus();
}
$("close-detail").addEventListener("click", closeDetail);
$("more-like-this").addEventListener("click", () => {
  const id = state.selected.id;
  $("detail").hidden = true;
  $("query").value = "";
  setQuery({ id });
  search(true);
  $("results").focus();
});

// ---- searching by image: pick, drop or paste -------------------------------------------
async function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("That is not an image.", "error");
    return;
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  const preview = URL.createObjectURL(file);
  $("query").value = "";
  setQuery({ image: btoa(binary), name: file.name || "pasted image", preview });
  search(true);
}

$("image-file").addEventListener("change", (event) => {
  searchImage(event.target.files[0]);
  event.target.value = "";
});
let dragDepth = 0;
window.addEventListener("dragenter", (event) => {
  if (![...event.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  $("drop").hidden = false;
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $("drop").hidden = true;
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  $("drop").hidden = true;
  if (event.dataTransfer.files.length) searchImage(event.dataTransfer.files[0]);
});
window.addEventListener("paste", (event) => {
  const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { event.preventDefault(); searchImage(file); }
});

// ---- filters ----------------------------------------------------------------------------
function applyFilters() {
  const { filter, count } = readFilters($("filter-rows"));
  state.filters = filter;
  $("filter-count").textContent = count ? `(${count})` : "";
  if (state.query) search(true); else { clearResults(); browse(); }
}

$("add-filter").addEventListener("click", () => addFilterRow($("filter-rows")));
$("apply-filters").addEventListener("click", applyFilters);
$("clear-filters").addEventListener("click", () => {
  $("filter-rows").replaceChildren();
  applyFilters();
});

// ---- keyboard ---------------------------------------------------------------------------
document.addEventListener("keydown", (event) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement?.tagName);
  if (event.key === "/" && !typing) { event.preventDefault(); $("query").focus(); }
  if (event.key === "Escape" && !$("detail").hidden) closeDetail();
});

start();
