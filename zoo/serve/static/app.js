// The fusion-zoo serve page: pick/drop inputs, POST /predict, draw a bar per class and per modality.
// No external fetches (the Content-Security-Policy allows only this server); user text is set with textContent.
"use strict";

const state = { model: null, files: { image: null, audio: null } };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "cls") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children || []) node.appendChild(c);
  return node;
}

function showError(message) {
  $("error").textContent = message || "";
}

function fmt(x) {
  if (typeof x !== "number") return String(x);
  return Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.001) ? x.toExponential(2) : x.toFixed(3);
}

function bar(key, value, max, cls, attrs) {
  const width = max > 0 ? Math.max(0, Math.min(1, value / max)) * 100 : 0;
  const fill = el("div", { cls: "fill", style: `width: ${width.toFixed(1)}%` });
  return el("div", Object.assign({ cls: `bar ${cls || ""}`.trim(), "data-key": key, "data-value": String(value) }, attrs || {}), [
    el("div", { cls: "key", text: key, title: key }),
    el("div", { cls: "track" }, [fill]),
    el("div", { cls: "val", text: fmt(value) }),
  ]);
}

// ---- inputs ------------------------------------------------------------------------------------
function setFile(modality, file) {
  const drop = $(`${modality}-drop`);
  const preview = drop.querySelector(".preview");
  const old = preview.querySelector("img, audio");
  if (old && old.src) URL.revokeObjectURL(old.src);
  preview.replaceChildren();
  state.files[modality] = file || null;
  $(`${modality}-clear`).hidden = !file;
  drop.querySelector(".hint").hidden = !!file;
  if (!file) { $(`${modality}-input`).value = ""; return; }
  const url = URL.createObjectURL(file);
  preview.appendChild(el("div", { cls: "name", text: `${file.name} (${(file.size / 1024).toFixed(1)} KB)` }));
  if (modality === "image") preview.appendChild(el("img", { src: url, alt: file.name }));
  else preview.appendChild(el("audio", { src: url, controls: "" }));
  showError("");
}

function wireDrop(modality) {
  const drop = $(`${modality}-drop`);
  const input = $(`${modality}-input`);
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => setFile(modality, input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) setFile(modality, e.dataTransfer.files[0]);
  });
  $(`${modality}-clear`).addEventListener("click", () => setFile(modality, null));
}

// ---- results -----------------------------------------------------------------------------------
// Per-modality numbers: any {modality: number} dict the prediction carries (contributions, the head's gates...).
function modalityGroups(pred, modalities) {
  const groups = [];
  const isModalityDict = (v) => v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length > 0
    && Object.entries(v).every(([k, x]) => modalities.includes(k) && typeof x === "number");
  const visit = (title, obj) => {
    if (!obj || typeof obj !== "object") return;
    for (const [k, v] of Object.entries(obj)) {
      if (isModalityDict(v)) groups.push({ title: title ? `${title}: ${k}` : k, values: v });
      else if (v && typeof v === "object" && !Array.isArray(v) && !title) visit(k, v);
    }
  };
  if (isModalityDict(pred.contributions)) groups.push({ title: "contribution to the prediction", values: pred.contributions });
  else if (pred.contributions) visit("contributions", pred.contributions);
  visit("", pred.explain);
  for (const g of groups) if (g.title === "gates" || g.title === "weights") g.title = `${g.title} (the head's own weights)`;
  return groups;
}

function render(pred) {
  const m = state.model;
  $("result").hidden = false;
  const label = pred.label !== undefined ? pred.label : (pred.labels ? (pred.labels.join(", ") || "(none)") : "");
  $("pred-label").textContent = label;
  const top = pred.probs && pred.label !== undefined ? pred.probs[pred.label] : undefined;
  $("pred-prob").textContent = top !== undefined ? `${(100 * top).toFixed(1)}%` : "";
  $("pred-inputs").textContent = `from ${(pred.inputs || []).join(" + ") || "?"}`;
  const scores = pred.probs || pred.values || {};
  const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]);
  const max = pred.probs ? 1 : Math.max(1e-12, ...entries.map(([, v]) => Math.abs(v)));
  $("class-bars").replaceChildren(...entries.map(([k, v], i) =>
    bar(k, v, max, i === 0 && pred.probs ? "top class" : "class", { "data-class": k })));
  const groups = modalityGroups(pred, m.modalities);
  const box = $("modality-bars");
  box.replaceChildren();
  if (!groups.length) box.appendChild(el("p", { cls: "muted", text: "this head reports no per-modality weights" }));
  for (const g of groups) {
    const vmax = Math.max(1e-12, ...Object.values(g.values).map(Math.abs));
    box.appendChild(el("div", { cls: "muted", text: g.title }));
    box.appendChild(el("div", { cls: "bars", "data-group": g.title },
      m.modalities.filter((k) => k in g.values).map((k) =>
        bar(k, g.values[k], vmax, "modality", { "data-modality": k, "data-group": g.title }))));
  }
}

async function predict() {
  const m = state.model;
  const form = new FormData();
  const text = m.modalities.includes("text") ? $("text-input").value : "";
  if (text.trim()) form.append("text", text);
  for (const mod of ["image", "audio"]) if (state.files[mod]) form.append(mod, state.files[mod], state.files[mod].name);
  if (![...form.keys()].length) {
    showError(`Give at least one input (${m.modalities.join(", ")}).`);
    return;
  }
  const size = [...form.values()].reduce((s, v) => s + (typeof v === "string" ? v.length : v.size), 0);
  if (size > m.limits.max_request_bytes) {
    showError(`The inputs are ${(size / 1048576).toFixed(1)} MB; this server takes at most ${(m.limits.max_request_bytes / 1048576).toFixed(1)} MB.`);
    return;
  }
  showError("");
  $("predict-btn").disabled = true;
  try {
    const resp = await fetch("/predict", { method: "POST", body: form });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `the server answered ${resp.status}`;
      const retry = resp.headers.get("Retry-After");
      showError(`${detail}${retry ? ` (retry in ${retry} s)` : ""}`);
      return;
    }
    render(body);
  } catch (e) {
    showError(`Could not reach the server (${e.message}); is fusion-zoo serve still running?`);
  } finally {
    $("predict-btn").disabled = false;
  }
}

// ---- model card ----------------------------------------------------------------------------------
function metricsTable(metrics) {
  const rows = [];
  for (const [split, groups] of Object.entries(metrics || {})) {
    if (!groups || typeof groups !== "object") continue;
    const flat = Object.fromEntries(Object.entries(groups).filter(([, v]) => typeof v !== "object"));
    if (Object.keys(flat).length) rows.push([split, "fused", flat]);
    const named = Object.entries(groups).filter(([, v]) => v && typeof v === "object");
    named.sort(([a], [b]) => (a === "fused" ? -1 : b === "fused" ? 1 : a.localeCompare(b)));
    for (const [group, values] of named) rows.push([split, group, values]);
  }
  if (!rows.length) return el("p", { cls: "muted", text: "no metrics recorded" });
  const cols = [...new Set(rows.flatMap(([, , v]) => Object.keys(v)))].sort();
  const head = el("tr", {}, [el("th", { text: "split" }), el("th", { text: "inputs" }), ...cols.map((c) => el("th", { text: c }))]);
  const body = rows.map(([s, g, v]) => el("tr", {}, [el("td", { text: s }), el("td", { text: g }),
    ...cols.map((c) => el("td", { text: !(c in v) ? "" : (Number.isInteger(v[c]) && Math.abs(v[c]) > 1 ? String(v[c]) : fmt(v[c])) }))]));
  return el("table", { id: "metrics-table" }, [el("thead", {}, [head]), el("tbody", {}, body)]);
}

async function init() {
  for (const mod of ["image", "audio"]) wireDrop(mod);
  $("predict-btn").addEventListener("click", predict);
  $("text-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) predict(); });
  let m;
  try {
    const resp = await fetch("/model");
    m = await resp.json();
  } catch (e) {
    showError(`Could not load the model description (${e.message}).`);
    return;
  }
  state.model = m;
  document.title = `${m.name} · fusion-zoo`;
  $("model-name").textContent = m.name;
  $("model-desc").textContent = `${m.stage} fusion · ${m.fusion_head} head · ${m.task} over ${m.labels.length} labels · inputs: ${m.modalities.join(", ")}`;
  for (const mod of ["text", "image", "audio"]) $(`${mod}-block`).hidden = !m.modalities.includes(mod);
  const enc = Object.entries(m.encoders).map(([k, v]) => `${k}: ${v.name} (${v.finetune})`).join(" · ");
  $("card-summary").textContent = `encoders: ${enc}${m.dataset ? ` · data: ${m.dataset}` : ""}`;
  $("card-metrics").replaceChildren(metricsTable(m.metrics));
  $("card-text").textContent = m.card || "(no card)";
  $("predict-btn").disabled = false;
  document.body.dataset.ready = "1";
}

init();
