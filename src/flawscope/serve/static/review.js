// flawscope review page: the queue of recorded verdicts, the image with its regions and heat
// map, one-key decisions (G good, D defect), and the confusion counts of reviewed records.
// Keyboard first: every action has a key; the mouse works too.
"use strict";

const R = {
  items: [],
  index: -1,
  cursor: null,
  loading: false,
  shown: 0, // selection token: a slow image load never overwrites a newer selection
  urls: [], // object URLs of the record shown (revoked when another is shown)
  auth: false,
  pending: null, // a decision waiting for the reviewer's name
  statsTimer: null,
};
const SVG = "http://www.w3.org/2000/svg";
const $ = (sel, root = document) => root.querySelector(sel);
const api = (url, options) => flawscopeApi.apiFetch(url, options);

function fmt(x) {
  if (x === null || x === undefined) return "n/a";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(3);
  return x.toPrecision(4);
}
const pct = (x) => `${(100 * x).toFixed(x < 0.01 ? 2 : 1)}%`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

// ---------------------------------------------------------------------------- queue
function query() {
  const show = $("#f-show").value;
  const p = new URLSearchParams({ limit: "50" });
  if (show === "queue") { p.set("queue", "true"); p.set("order", "asc"); }
  if (show === "reviewed") p.set("reviewed", "true");
  const verdict = $("#f-verdict").value;
  if (verdict) p.set("verdict", verdict);
  // datetime-local is the browser's local time: sent as UTC
  for (const [id, key] of [["#f-from", "from"], ["#f-to", "to"]]) {
    const v = $(id).value;
    if (v) p.set(key, new Date(v).toISOString());
  }
  const min = $("#f-min").value;
  if (min !== "") p.set("min_score", min);
  return p;
}

async function loadPage(reset) {
  if (R.loading) return;
  R.loading = true;
  try {
    const p = query();
    if (!reset && R.cursor !== null) p.set("cursor", String(R.cursor));
    const r = await api(`/v1/inspections?${p}`);
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      $("#queue-info").textContent = `records unavailable: ${body.detail || `HTTP ${r.status}`}`;
      return;
    }
    if (reset) { R.items = []; R.index = -1; }
    R.items.push(...body.items);
    R.cursor = body.next_cursor;
    renderQueue();
    $("#more").hidden = R.cursor === null;
    if (reset) {
      if (R.items.length) select(0);
      else showNothing();
    }
  } finally {
    R.loading = false;
  }
}

function itemText(it) {
  const verdict = it.verdict === "defect" ? "REJECT" : "PASS";
  const part = it.part_id ? ` · part ${it.part_id}` : "";
  return `#${it.id} · ${verdict} · ${fmt(it.score)}${part}`;
}

function renderQueue() {
  const list = $("#queue");
  list.replaceChildren(...R.items.map((it, i) => {
    const li = document.createElement("li");
    li.id = `rec-${it.id}`;
    li.setAttribute("role", "option");
    li.dataset.index = String(i);
    li.dataset.verdict = it.verdict;
    li.className = `item ${it.verdict}`;
    if (it.truth) li.dataset.truth = it.truth;
    const main = document.createElement("span");
    main.className = "item-main";
    main.textContent = itemText(it);
    const sub = document.createElement("span");
    sub.className = "item-sub";
    sub.textContent = when(it.created_at);
    li.append(main, sub);
    li.setAttribute("aria-selected", String(i === R.index));
    return li;
  }));
  if (R.index >= 0) list.setAttribute("aria-activedescendant", `rec-${R.items[R.index].id}`);
}

function markItem(i) {
  const it = R.items[i];
  const li = $(`#rec-${it.id}`);
  if (!li) return;
  li.dataset.truth = it.truth || "";
}

function select(i) {
  if (i < 0 || i >= R.items.length) return;
  const list = $("#queue");
  const old = list.querySelector("[aria-selected='true']");
  if (old) old.setAttribute("aria-selected", "false");
  R.index = i;
  const li = $(`#rec-${R.items[i].id}`);
  if (li) {
    li.setAttribute("aria-selected", "true");
    li.scrollIntoView({ block: "nearest" });
    list.setAttribute("aria-activedescendant", li.id);
  }
  show(R.items[i]);
}

async function move(step) {
  let i = R.index + step;
  if (i >= R.items.length && R.cursor !== null) {
    await loadPage(false);
  }
  i = Math.max(0, Math.min(i, R.items.length - 1));
  if (i !== R.index) select(i);
}

// ---------------------------------------------------------------------------- one record
function showNothing() {
  R.shown += 1;
  $("#record-title").textContent = $("#f-show").value === "queue"
    ? "Nothing to review" : "No records match";
  $("#record-meta").textContent = "";
  $("#record-review").textContent = "";
  for (const id of ["#photo", "#photo2", "#heat"]) $(id).removeAttribute("src");
  $("#boxes").replaceChildren();
  $("#viewer").dataset.record = "";
}

function setAspect(width, height) {
  for (const stage of document.querySelectorAll("#viewer .stage")) {
    stage.style.setProperty("--ar", String(width / height));
  }
  $("#boxes").setAttribute("viewBox", `0 0 ${width} ${height}`);
}

function drawRegions(regions) {
  $("#boxes").replaceChildren(...(regions || []).map((reg) => {
    const [x0, y0, x1, y1] = reg.bbox;
    const rect = document.createElementNS(SVG, "rect");
    for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 })) {
      rect.setAttribute(k, String(v));
    }
    rect.classList.toggle("peak", Boolean(reg.peak));
    return rect;
  }));
}

function reviewText(it) {
  if (!it.truth) return "Not reviewed yet.";
  const type = it.defect_type ? ` (${it.defect_type})` : "";
  return `Reviewed: ${it.truth}${type} by ${it.reviewer} at ${when(it.reviewed_at)}.`;
}

async function show(it) {
  const token = ++R.shown;
  R.urls.forEach((u) => URL.revokeObjectURL(u));
  R.urls = [];
  const viewer = $("#viewer");
  viewer.dataset.record = String(it.id);
  viewer.dataset.verdict = it.verdict;
  const part = it.part_id ? ` · part ${it.part_id}` : "";
  $("#record-title").textContent = `#${it.id} · ${it.file_name}${part}`;
  const where = [it.station, it.line, it.camera].filter(Boolean).join(" / ");
  const label = it.label ? ` · ${it.label} ${pct(it.label_probability || 0)}` : "";
  const cmp = it.verdict === "defect" ? ">" : "≤";
  $("#record-meta").textContent =
    `${it.verdict === "defect" ? "REJECT" : "PASS"} · score ${fmt(it.score)} ${cmp} ` +
    `threshold ${fmt(it.threshold)} · ${it.n_regions} region${it.n_regions === 1 ? "" : "s"}` +
    `${label} · ${when(it.created_at)}${where ? ` · ${where}` : ""} · model ` +
    `${it.model_id.slice(0, 12)}`;
  $("#record-review").textContent = reviewText(it);
  $("#defect-type").value = it.defect_type || "";
  $("#note").value = "";
  setAspect(it.width, it.height);
  drawRegions(it.regions);
  for (const id of ["#photo", "#photo2", "#heat"]) $(id).removeAttribute("src");
  if (!it.image_url) {
    $("#record-review").textContent += " The image was not kept.";
    return;
  }
  const [photo, heat] = await Promise.all([
    flawscopeApi.imageUrl(`${it.image_url}?as=png`),
    it.heatmap_url ? flawscopeApi.imageUrl(it.heatmap_url) : Promise.resolve(null)]);
  if (token !== R.shown) { // another record was selected meanwhile
    [photo, heat].forEach((u) => u && URL.revokeObjectURL(u));
    return;
  }
  R.urls = [photo, heat].filter(Boolean);
  if (photo) { $("#photo").src = photo; $("#photo2").src = photo; }
  if (heat) $("#heat").src = heat;
}

// ---------------------------------------------------------------------------- decisions
function reviewerName() {
  return $("#reviewer").value.trim();
}

async function decide(truth) {
  const it = R.items[R.index];
  if (!it) return;
  if (!R.auth && !reviewerName()) { // with API keys the key's name is the reviewer
    R.pending = truth;
    $("#record-review").textContent = "Enter your name as reviewer, then press Enter.";
    $("#reviewer").focus();
    return;
  }
  const body = { truth, note: $("#note").value.trim() || null };
  if (reviewerName()) body.reviewer = reviewerName();
  if (truth === "defect") body.defect_type = $("#defect-type").value.trim() || null;
  const r = await api(`/v1/inspections/${it.id}/review`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => ({}));
  if (!r.ok) {
    $("#record-review").textContent = `Not saved: ${answer.detail || `HTTP ${r.status}`}`;
    return;
  }
  Object.assign(it, answer);
  markItem(R.index);
  scheduleStats();
  const i = R.index;
  if (i + 1 < R.items.length || R.cursor !== null) {
    await move(1);
  } else {
    $("#record-review").textContent = reviewText(it);
  }
  if (i === R.index) $("#record-review").textContent = reviewText(it);
}

// ---------------------------------------------------------------------------- stats
function rateText(p) {
  if (!p || p.rate === null || p.rate === undefined) return "n/a (nothing reviewed)";
  const k = p.n !== undefined && p.n !== null ? `${p.k} of ${p.n} · ` : "";
  return `${pct(p.rate)} (${k}95% CI ${pct(p.low)}–${pct(p.high)})`;
}

async function loadStats() {
  const p = new URLSearchParams();
  for (const [id, key] of [["#f-from", "from"], ["#f-to", "to"]]) {
    const v = $(id).value;
    if (v) p.set(key, new Date(v).toISOString());
  }
  const r = await api(`/v1/inspections/stats?${p}`);
  if (!r.ok) return;
  const s = await r.json();
  const c = s.confusion.counts;
  for (const v of ["reject", "pass"]) {
    for (const t of ["good", "defect"]) $(`[data-cell='${v}-${t}']`).textContent = String(c[v][t]);
  }
  for (const key of ["false_reject_share", "escape_rate", "false_reject_rate"]) {
    $(`[data-rate='${key}']`).textContent = rateText(s.confusion[key]);
  }
  $("#confusion-title").textContent = `Reviewed: ${s.confusion.reviewed}`;
  const keep = s.keep_goods === null || s.keep_goods === undefined ? ""
    : ` · ${pct(s.keep_goods)} of passes sampled`;
  $("#queue-info").textContent = `${s.queue} to review · ${s.confusion.inspected.total} ` +
    `inspected${keep}`;
  $("#defect-types").replaceChildren(...Object.keys(s.defect_types).map((t) => {
    const o = document.createElement("option");
    o.value = t;
    return o;
  }));
}

function scheduleStats() {
  clearTimeout(R.statsTimer);
  R.statsTimer = setTimeout(loadStats, 300);
}

// ---------------------------------------------------------------------------- keys
function typing(el) {
  return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
}

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if ($("#key-dialog[open]")) return;
  const el = document.activeElement;
  if (typing(el)) {
    if (e.key === "Escape") { el.blur(); $("#queue").focus(); e.preventDefault(); return; }
    if (e.key !== "Enter" || el.tagName === "SELECT") return;
    e.preventDefault();
    if (el.id === "defect-type") { el.blur(); $("#queue").focus(); decide("defect"); }
    else if (el.id === "reviewer") {
      localStorage.setItem("flawscope-reviewer", reviewerName());
      el.blur();
      $("#queue").focus();
      if (R.pending && reviewerName()) { const t = R.pending; R.pending = null; decide(t); }
    } else { el.blur(); $("#queue").focus(); }
    return;
  }
  const actions = {
    g: () => decide("good"), d: () => decide("defect"),
    j: () => move(1), ArrowDown: () => move(1), k: () => move(-1), ArrowUp: () => move(-1),
    t: () => $("#defect-type").focus(), n: () => $("#note").focus(),
    h: () => document.body.classList.toggle("hide-heat"),
  };
  const act = actions[e.key] || actions[e.key.toLowerCase()];
  if (act && !(e.key === " ")) {
    e.preventDefault();
    act();
  }
}

// ---------------------------------------------------------------------------- setup
async function loadModel() {
  const r = await api("/v1/model");
  if (!r.ok) return;
  const m = await r.json();
  R.auth = Boolean(m.auth);
  if (R.auth) $("#reviewer").placeholder = "(your key's name)";
}

function setup() {
  $("#reviewer").value = localStorage.getItem("flawscope-reviewer") || "";
  $("#reviewer").addEventListener("change", () =>
    localStorage.setItem("flawscope-reviewer", reviewerName()));
  document.addEventListener("keydown", onKey);
  $("#btn-good").addEventListener("click", () => decide("good"));
  $("#btn-defect").addEventListener("click", () => decide("defect"));
  $("#more").addEventListener("click", () => loadPage(false));
  $("#queue").addEventListener("click", (e) => {
    const li = e.target.closest("li[role='option']");
    if (li) select(Number(li.dataset.index));
  });
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  $("#filters").addEventListener("change", () => { loadPage(true); scheduleStats(); });
  Promise.all([loadModel(), loadPage(true), loadStats()]);
  $("#queue").focus();
}

document.addEventListener("DOMContentLoaded", setup);
