// The search page: builds a POST /search request from the form and shows the results grid.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageId: null };  // an uploaded file, or an indexed item's id

async function api(path, options) {
  const res = await fetch(path, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function setImage(file, itemId, previewUrl) {
  state.image = file;
  state.imageId = itemId;
  const has = file !== null || itemId !== null;
  $("drop-preview").hidden = !has;
  $("clear-image").hidden = !has;
  $("drop-label").textContent = has ? (itemId ? `item ${itemId}` : file.name) : "Drop an image or click to pick";
  if (has) $("drop-preview").src = previewUrl;
}

async function search() {
  const form = new FormData();
  const text = $("text").value.trim();
  if (text) form.append("text", text);
  if (state.image) form.append("image", state.image, state.image.name);
  if (state.imageId) form.append("image_id", state.imageId);
  if (!text && !state.image && !state.imageId) {
    setStatus("Type a query, or give an image.", true);
    return;
  }
  form.append("k", $("k").value || "12");
  form.append("image_weight", $("image-weight").value || "0.5");
  if ($("strategy").value) form.append("strategy", $("strategy").value);
  if ($("dedup").checked && state.dedup) form.append("dedup", String(state.dedup));
  if (!$("rerank-box").hidden && $("rerank").value) form.append("rerank", $("rerank").value);
  for (const cond of $("where").value.split(",")) if (cond.trim()) form.append("where", cond.trim());
  setStatus("Searching…");
  const started = performance.now();
  try {
    const out = await api("/search", { method: "POST", body: form });
    render(out);
    const ms = Math.round(performance.now() - started);
    const reranked = form.has("rerank") ? ` · re-ranked top ${form.get("rerank")}` : "";
    setStatus(`${out.results.length} results · ${out.strategy}${reranked} · ${out.target} · ${ms} ms`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function render(out) {
  const grid = $("results");
  grid.replaceChildren();
  for (const r of out.results) {
    const card = document.createElement("figure");
    card.className = "result";
    card.dataset.id = r.id;
    card.title = "Search by this image";
    const img = document.createElement("img");
    img.src = `${r.image_url}?size=256`;
    img.alt = r.captions[0] || r.id;
    img.loading = "lazy";
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const caption = r.caption ? r.caption.text : (r.captions[0] || "");
    const parts = Object.entries(r.scores || {}).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(" · ");
    meta.innerHTML = `<div><span class="score"></span> <span class="rank"></span></div>
      <div class="caption"></div><div class="parts"></div>`;
    meta.querySelector(".score").textContent = r.score.toFixed(3);
    const folded = r.duplicates && r.duplicates.length ? ` (+${r.duplicates.length} near-copies)` : "";
    meta.querySelector(".rank").textContent = `#${r.rank} ${r.id}${folded}`;
    meta.querySelector(".caption").textContent = caption;
    meta.querySelector(".parts").textContent = parts;
    card.append(img, meta);
    card.addEventListener("click", () => {
      $("text").value = "";
      setImage(null, r.id, img.src);
      search();
    });
    grid.append(card);
  }
}

function pick(file) {
  if (!file) return;
  setImage(file, null, URL.createObjectURL(file));
}

async function init() {
  const drop = $("drop");
  drop.addEventListener("click", (e) => { if (e.target.id !== "clear-image") $("file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
  $("file").addEventListener("change", () => pick($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
  $("clear-image").addEventListener("click", () => { $("file").value = ""; setImage(null, null, ""); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  try {
    const stats = await api("/stats");
    $("index-name").textContent = stats.name;
    state.dedup = stats.default_dedup;
    $("rerank-box").hidden = !stats.rerank;
    $("stats").textContent = `${stats.counts.items} items · ${stats.counts.captions} captions · ${stats.model}`;
    for (const s of stats.strategies) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = s;
      $("strategy").append(opt);
    }
  } catch (err) {
    setStatus(`cannot reach the server: ${err.message}`, true);
  }
}

init();
