// flawscope inspection page: upload images to /v1/predict, show verdicts, heat maps and regions
// (and the class + state label when the service runs a classifier).
"use strict";

const state = {
  limits: { max_files: 64, max_upload_bytes: 64 * 1024 * 1024 },
  queue: Promise.resolve(),
  nextId: 0,
  results: new Map(), // card id -> the service's result for it (or {verdict: "error"})
  zoomOpener: null,
};

// colormap stops (matplotlib, 9 evenly spaced samples) for the heat-map legend
const COLORMAPS = {
  turbo: "30123b 466be3 28bceb 32f298 a4fc3c eecf3a fb7e21 d02f05 7a0403",
  viridis: "440154 472d7b 3b528b 2c728e 21918c 28ae80 5ec962 addc30 fde725",
  inferno: "000004 210c4a 57106e 8a226a bc3754 e45a31 f98e09 f9cb35 fcffa4",
  magma: "000004 1d1147 51127c 832681 b73779 e75263 fc8961 fec488 fcfdbf",
  plasma: "0d0887 4c02a1 7e03a8 aa2395 cc4778 e66c5c f89540 fdc527 f0f921",
  jet: "000080 0000ff 0080ff 16ffe1 7dff7a e4ff13 ff9400 ff1e00 800000",
  gray: "000000 ffffff",
};
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (sel, root = document) => root.querySelector(sel);

function fmt(x) {
  if (x === null || x === undefined) return "n/a";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3);
  return x.toPrecision(4);
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

// ---------------------------------------------------------------------------- model, legend
async function loadModel() {
  try {
    const r = await flawscopeApi.apiFetch("/v1/model");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const m = await r.json();
    state.limits = m.limits;
    $("#review-link").hidden = !m.recording; // the review page exists where verdicts are recorded
    const [h, w] = m.input_size;
    // the server's wording (the same as `flawscope fit` and the report): an uncertified
    // target is shown with the rate that is actually guaranteed
    const rule = m.threshold_summary || m.threshold.rule;
    const clf = m.classifier ? ` · classifier: ${plural(m.classifier.labels.length, "label")}` : "";
    $("#model-info").textContent =
      `${m.model} · ${w}×${h} ${m.color} · threshold ${fmt(m.threshold.value)} (${rule}) · ` +
      `${m.runtime}${clf}`;
    $("#model-info").title = m.threshold_description;
    $("#drop-hint").textContent =
      `PNG, JPEG, BMP, TIFF, WebP · up to ${m.limits.max_files} images per request, ` +
      `${(m.limits.max_upload_bytes / 1048576).toFixed(0)} MiB per request`;
    showLegend(m.heatmap || {});
  } catch (err) {
    $("#model-info").textContent = `model information unavailable (${err.message})`;
  }
}

function showLegend({ colormap = "turbo", scale = "score" }) {
  const stops = (COLORMAPS[colormap] || COLORMAPS.gray).split(" ").map((c) => `#${c}`);
  const legend = $("#legend");
  const bar = $(".legend-bar", legend);
  bar.style.backgroundImage = `linear-gradient(to right, ${stops.join(", ")})`;
  const ticks = scale === "score"
    ? ["normal", "threshold", "2× threshold"]
    : ["lowest", "relative to each image", "highest"];
  $(".legend-ticks", legend).replaceChildren(...ticks.map((t) => {
    const span = document.createElement("span");
    span.textContent = t;
    return span;
  }));
  bar.setAttribute("aria-label", `Heat map colours (${colormap}): ` + (scale === "score"
    ? "left is normal, the middle is the decision threshold, right is twice the threshold"
    : "scaled to each image's own range, left lowest, right highest"));
  legend.dataset.colormap = colormap;
  legend.dataset.scale = scale;
  legend.hidden = false;
}

// ---------------------------------------------------------------------------- cards
function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const id = String(state.nextId++);
  card.dataset.id = id;
  card.dataset.file = file.name;
  const name = $(".name", card);
  name.textContent = file.name;
  name.title = file.name;
  name.id = `card-name-${id}`;
  card.setAttribute("aria-labelledby", name.id);
  $(".frame", card).setAttribute("aria-label", `Enlarge ${file.name}`);
  const photo = $(".photo", card);
  photo.alt = file.name;
  photo.addEventListener("load", () => {
    if (!card.dataset.width) setAspect(card, photo.naturalWidth, photo.naturalHeight);
  });
  photo.addEventListener("error", () => {
    photo.hidden = true;
    $(".no-preview", card).hidden = false;
    card.classList.add("opaque-heat");
  });
  photo.src = URL.createObjectURL(file);
  return card;
}

// the stage (photo, heat map, region boxes) takes the image's own aspect ratio
function setAspect(card, width, height) {
  if (!(width > 0 && height > 0)) return;
  card.dataset.width = String(width);
  card.dataset.height = String(height);
  $(".stage", card).style.setProperty("--ar", String(width / height));
  $(".regions", card).setAttribute("viewBox", `0 0 ${width} ${height}`);
}

function drawRegions(svg, regions) {
  svg.replaceChildren(...regions.map((reg, i) => {
    const [x0, y0, x1, y1] = reg.bbox;
    const rect = document.createElementNS(SVG_NS, "rect");
    for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 })) {
      rect.setAttribute(k, String(v));
    }
    rect.classList.toggle("peak", Boolean(reg.peak));
    rect.classList.toggle("watch", reg.status === "watch");
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `${reg.status === "watch" ? "watch " : ""}region ${i + 1}: ${x1 - x0}×${y1 - y0} px, ` +
      `${reg.area_px} pixels, max score ${fmt(reg.max_score)}`;
    rect.append(title);
    return rect;
  }));
}

function regionText(regions) {
  if (!regions.length) return "no defect regions";
  const largest = regions.reduce((a, b) => (b.area_px > a.area_px ? b : a));
  const mm2 = largest.area_mm2 == null ? "" : ` (${fmt(largest.area_mm2)} mm²)`;
  const peak = regions.some((r) => r.peak) ? " · dashed: around the map maximum" : "";
  const watch = regions.some((r) => r.status === "watch") ? " · OK part, dotted: watch here" : "";
  return `${plural(regions.length, "region")} · largest ${largest.area_px} pixels${mm2}${peak}${watch}`;
}

function pct(p) { return `${(100 * p).toFixed(1)}%`; }

// the class + state label (absent from services without a classifier, and from older ones)
function showClassification(card, cls) {
  const el = $(".class-text", card);
  if (!cls) return;
  el.textContent = `${cls.label} · ${pct(cls.probability)}`;
  const top = Array.isArray(cls.top) && cls.top.length > 1
    ? `; next: ${cls.top.slice(1).map((t) => `${t.label} ${pct(t.probability)}`).join(", ")}`
    : "";
  el.title = `class ${cls.class}, state ${cls.state}${top}`;
  el.hidden = false;
}

function showResult(card, res) {
  state.results.set(card.dataset.id, res);
  card.classList.remove("pending");
  card.classList.add(res.verdict);
  card.dataset.verdict = res.verdict;
  card.removeAttribute("aria-busy");
  $(".badge", card).textContent = res.verdict === "ok" ? "OK" : "DEFECT";
  const n = res.normalized_score ?? 0;
  $(".fill", card).style.width = `${Math.round(100 * Math.min(1, Math.max(0, n)))}%`;
  const cmp = res.verdict === "defect" ? ">" : "≤";
  const nums = $(".nums", card);
  nums.textContent =
    `score ${fmt(res.score)} ${cmp} threshold ${fmt(res.threshold)} · ${res.width}×${res.height}`;
  nums.title = `normalised score ${fmt(res.normalized_score)} (threshold at 0.5)`;
  setAspect(card, res.width, res.height);
  if (Array.isArray(res.regions)) { // absent from older services
    drawRegions($(".regions", card), res.regions);
    const text = $(".region-text", card);
    text.textContent = regionText(res.regions);
    text.hidden = false;
  }
  showClassification(card, res.classification);
  if (res.heatmap_png) {
    const heat = $(".heat", card);
    heat.src = `data:image/png;base64,${res.heatmap_png}`;
    heat.hidden = false;
  }
  applyView();
}

function showError(card, message) {
  state.results.set(card.dataset.id, { verdict: "error", detail: message });
  card.classList.remove("pending");
  card.classList.add("error");
  card.dataset.verdict = "error";
  card.removeAttribute("aria-busy");
  $(".badge", card).textContent = "ERROR";
  $(".photo", card).hidden = true;
  const note = $(".no-preview", card);
  note.textContent = "unreadable";
  note.hidden = false;
  $(".nums", card).textContent = message;
  $(".nums", card).title = message;
  applyView();
}

// ---------------------------------------------------------------------------- requests
async function post(items) {
  const form = new FormData();
  for (const it of items) form.append("files", it.file, it.file.name);
  const r = await flawscopeApi.apiFetch("/v1/predict", { method: "POST", body: form });
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

// ---------------------------------------------------------------------------- view
function cards() { return Array.from(document.querySelectorAll("#results .card")); }

function updateSummary() {
  const all = cards();
  const count = (v) => all.filter((c) => c.dataset.verdict === v).length;
  const ok = count("ok");
  const defect = count("defect");
  const errors = count("error");
  const pending = count("pending");
  const done = ok + defect;
  const el = $("#summary");
  $("#download").disabled = done + errors === 0;
  if (!all.length) {
    el.textContent = "No images inspected yet.";
    el.className = "summary";
    return;
  }
  let text = `${ok} of ${done} passed · ${plural(defect, "defect")}`;
  if (errors) text += ` · ${errors} unreadable`;
  if (pending) text += ` · ${pending} inspecting…`;
  if (el.textContent !== text) el.textContent = text; // no repeated announcement
  el.className = `summary ${defect ? "has-defects" : done ? "all-ok" : ""}`;
  el.dataset.ok = String(ok);
  el.dataset.defect = String(defect);
  el.dataset.pending = String(pending);
}

function applyView() {
  const show = $("#show-heatmap").checked;
  const opacity = Number($("#opacity").value) / 100;
  const filter = $("#filter").value;
  document.body.classList.toggle("hide-heat", !show);
  for (const card of cards()) {
    const heat = $(".heat", card);
    heat.style.opacity = card.classList.contains("opaque-heat") ? "1" : String(opacity);
    const v = card.dataset.verdict;
    card.hidden = !(filter === "all" || v === filter || v === "pending");
  }
  updateSummary();
}

// ---------------------------------------------------------------------------- zoom
function openZoom(card) {
  const dialog = $("#zoom");
  state.zoomOpener = $(".frame", card);
  $("#zoom-title").textContent = card.dataset.file;
  const stage = $(".stage", card).cloneNode(true);
  stage.querySelectorAll("[id]").forEach((el) => el.removeAttribute("id"));
  $(".zoom-frame", dialog).replaceChildren(stage);
  $(".zoom-text", dialog).textContent = [".badge", ".class-text", ".nums", ".region-text"]
    .map((s) => $(s, card)).filter((el) => !el.hidden).map((el) => el.textContent).join(" · ");
  dialog.showModal();
  $("#zoom-close").focus();
}

// ---------------------------------------------------------------------------- CSV
function csvField(value) {
  let s = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(s) && typeof value === "string") s = `'${s}`; // no spreadsheet formulas
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function resultsCsv() {
  const done = cards().map((card) => [card, state.results.get(card.dataset.id)])
    .filter(([, res]) => res); // not those still inspecting
  const classified = done.some(([, res]) => res.classification);
  const rows = [["file", "score", "normalized_score", "verdict", "regions",
                 ...(classified ? ["label", "label_probability"] : [])]];
  for (const [card, res] of done) {
    const cls = res.classification;
    rows.push([card.dataset.file, res.score, res.normalized_score, res.verdict,
               Array.isArray(res.regions) ? res.regions.length : null,
               ...(classified ? [cls ? cls.label : null, cls ? cls.probability : null] : [])]);
  }
  return rows.map((r) => r.map(csvField).join(",")).join("\r\n") + "\r\n";
}

function downloadCsv() {
  const url = URL.createObjectURL(new Blob([resultsCsv()], { type: "text/csv" }));
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const a = Object.assign(document.createElement("a"),
                          { href: url, download: `flawscope-results-${stamp}.csv` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------------------- setup
function setup() {
  const drop = $("#drop");
  const input = $("#file-input");
  $("#choose").addEventListener("click", () => input.click());
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
  // dropping outside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  ["#show-heatmap", "#opacity", "#filter"].forEach((s) => $(s).addEventListener("input", applyView));
  $("#results").addEventListener("click", (e) => {
    const frame = e.target.closest(".frame");
    if (frame) openZoom(frame.closest(".card"));
  });
  const zoom = $("#zoom");
  $("#zoom-close").addEventListener("click", () => zoom.close());
  zoom.addEventListener("click", (e) => { if (e.target === zoom) zoom.close(); }); // backdrop
  zoom.addEventListener("close", () => {
    if (state.zoomOpener && state.zoomOpener.isConnected) state.zoomOpener.focus();
    state.zoomOpener = null;
  });
  $("#download").addEventListener("click", downloadCsv);
  $("#clear").addEventListener("click", () => {
    for (const c of cards()) {
      const photo = $(".photo", c);
      if (photo.src.startsWith("blob:")) URL.revokeObjectURL(photo.src);
      c.remove();
    }
    state.results.clear();
    updateSummary();
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
