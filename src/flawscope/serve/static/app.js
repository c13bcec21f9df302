// flawscope inspection page: upload images to /v1/predict, show verdicts and heatmaps.
"use strict";

const state = {
  limits: { max_files: 64, max_upload_bytes: 64 * 1024 * 1024 },
  queue: Promise.resolve(),
  nextId: 0,
};

const $ = (sel) => document.querySelector(sel);

function fmt(x) {
  if (x === null || x === undefined) return "n/a";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3);
  return x.toPrecision(4);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const m = await r.json();
    state.limits = m.limits;
    const [h, w] = m.input_size;
    const rule = m.threshold.rule === "good-quantile"
      ? `≤ ${(100 * m.threshold.max_frr).toFixed(1)}% good parts rejected`
      : m.threshold.rule;
    $("#model-info").textContent =
      `${m.model} · ${w}×${h} ${m.color} · threshold ${fmt(m.threshold.value)} (${rule}) · ${m.runtime}`;
    $("#model-info").title = m.threshold_description;
    $("#drop-hint").textContent =
      `PNG, JPEG, BMP, TIFF, WebP · up to ${m.limits.max_files} images per request, ` +
      `${(m.limits.max_upload_bytes / 1048576).toFixed(0)} MiB per request`;
    if (m.heatmap.scale === "image") {
      $("#drop-hint").textContent += " · heatmaps are relative to each image";
    }
  } catch (err) {
    $("#model-info").textContent = `model information unavailable (${err.message})`;
  }
}

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.dataset.id = String(state.nextId++);
  card.dataset.file = file.name;
  card.querySelector(".name").textContent = file.name;
  card.querySelector(".name").title = file.name;
  const photo = card.querySelector(".photo");
  photo.alt = file.name;
  photo.src = URL.createObjectURL(file);
  photo.addEventListener("error", () => {
    photo.hidden = true;
    card.querySelector(".no-preview").hidden = false;
    card.classList.add("opaque-heat");
  });
  return card;
}

function showResult(card, res) {
  card.classList.remove("pending");
  card.classList.add(res.verdict);
  card.dataset.verdict = res.verdict;
  const badge = card.querySelector(".badge");
  badge.textContent = res.verdict === "ok" ? "OK" : "DEFECT";
  const n = res.normalized_score ?? 0;
  card.querySelector(".fill").style.width = `${Math.round(100 * n)}%`;
  const cmp = res.verdict === "defect" ? ">" : "≤";
  card.querySelector(".nums").textContent =
    `score ${fmt(res.score)} ${cmp} threshold ${fmt(res.threshold)} · ${res.width}×${res.height}`;
  card.querySelector(".nums").title =
    `normalised score ${fmt(res.normalized_score)} (threshold at 0.5)`;
  if (res.heatmap_png) {
    const heat = card.querySelector(".heat");
    heat.src = `data:image/png;base64,${res.heatmap_png}`;
    heat.hidden = false;
  }
  applyView();
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("error");
  card.dataset.verdict = "error";
  card.querySelector(".badge").textContent = "ERROR";
  card.querySelector(".photo").hidden = true;
  const note = card.querySelector(".no-preview");
  note.textContent = "unreadable";
  note.hidden = false;
  card.querySelector(".nums").textContent = message;
  card.querySelector(".nums").title = message;
  applyView();
}

async function post(items) {
  const form = new FormData();
  for (const it of items) form.append("files", it.file, it.file.name);
  const r = await fetch("/v1/predict", { method: "POST", body: form });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON */ }
  return { status: r.status, body };
}

// Send one chunk; a 4xx naming one file marks that file and the rest is sent again.
async function inspectChunk(items) {
  while (items.length) {
    let resp;
    try {
      resp = await post(items);
    } catch (err) {
      items.forEach((it) => showError(it.card, `network error: ${err.message}`));
      return;
    }
    if (resp.status === 200 && resp.body) {
      resp.body.results.forEach((res, i) => showResult(items[i].card, res));
      return;
    }
    const detail = (resp.body && resp.body.detail) || `HTTP ${resp.status}`;
    let bad = -1;
    if (resp.body && Number.isInteger(resp.body.index)) bad = resp.body.index;
    else if (resp.body && resp.body.file !== undefined) {
      bad = items.findIndex((it) => it.file.name === resp.body.file);
    }
    if (resp.status === 503) { // the service is busy: wait and send again
      await new Promise((ok) => setTimeout(ok, 1000));
      continue;
    }
    if (bad < 0 || bad >= items.length || resp.status >= 500) {
      items.forEach((it) => showError(it.card, detail));
      return;
    }
    showError(items[bad].card, detail);
    items = items.filter((_, i) => i !== bad);
  }
}

function chunks(items) {
  const out = [];
  let cur = [];
  let bytes = 0;
  const maxBytes = state.limits.max_upload_bytes * 0.95;
  for (const it of items) {
    if (cur.length && (cur.length >= state.limits.max_files || bytes + it.file.size > maxBytes)) {
      out.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(it);
    bytes += it.file.size;
  }
  if (cur.length) out.push(cur);
  return out;
}

function handleFiles(fileList) {
  const items = Array.from(fileList).map((file) => ({ file, card: null }));
  if (!items.length) return;
  const batch = document.createDocumentFragment(); // newest batch first, in selection order
  items.forEach((it) => { it.card = newCard(it.file); batch.append(it.card); });
  $("#results").prepend(batch);
  updateSummary();
  for (const chunk of chunks(items)) {
    state.queue = state.queue.then(() => inspectChunk(chunk)).then(updateSummary);
  }
}

function updateSummary() {
  const cards = Array.from(document.querySelectorAll("#results .card"));
  const count = (v) => cards.filter((c) => c.dataset.verdict === v).length;
  const ok = count("ok");
  const defect = count("defect");
  const errors = count("error");
  const pending = count("pending");
  const done = ok + defect;
  const el = $("#summary");
  if (!cards.length) {
    el.textContent = "No images inspected yet.";
    el.className = "summary";
    return;
  }
  let text = `${ok} of ${done} passed · ${defect} defect${defect === 1 ? "" : "s"}`;
  if (errors) text += ` · ${errors} unreadable`;
  if (pending) text += ` · ${pending} inspecting…`;
  el.textContent = text;
  el.className = `summary ${defect ? "has-defects" : done ? "all-ok" : ""}`;
  el.dataset.ok = String(ok);
  el.dataset.defect = String(defect);
  el.dataset.pending = String(pending);
}

function applyView() {
  const show = $("#show-heatmap").checked;
  const opacity = Number($("#opacity").value) / 100;
  const filter = $("#filter").value;
  document.querySelectorAll("#results .card").forEach((card) => {
    const heat = card.querySelector(".heat");
    heat.style.opacity = show ? String(card.classList.contains("opaque-heat") ? 1 : opacity) : "0";
    const v = card.dataset.verdict;
    card.hidden = !(filter === "all" || v === filter || v === "pending");
  });
  updateSummary();
}

function setup() {
  const drop = $("#drop");
  const input = $("#file-input");
  input.addEventListener("change", () => { handleFiles(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  // dropping outside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  ["#show-heatmap", "#opacity", "#filter"].forEach((s) => $(s).addEventListener("input", applyView));
  $("#clear").addEventListener("click", () => {
    document.querySelectorAll("#results .card").forEach((c) => {
      const photo = c.querySelector(".photo");
      if (photo.src.startsWith("blob:")) URL.revokeObjectURL(photo.src);
      c.remove();
    });
    updateSummary();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
