// The fusion-zoo serve page: pick/drop inputs, POST /predict, draw a bar per class and per modality.
// No external fetches (the Content-Security-Policy allows only this server); user text is set with textContent.
// A new request or an error clears the previous result; a group with negative values is drawn around a centre axis
// (bars to the left are negative); an input that was not given is marked "not given" instead of drawn.
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

// One bar. `signed`: the track has a centre axis, positive values grow right of it and negative ones left.
function bar(key, value, max, cls, attrs, signed) {
  const frac = max > 0 ? Math.min(1, Math.abs(value) / max) : 0;
  let fill;
  if (signed) {
    const half = (frac * 50).toFixed(1);
    const side = value < 0 ? `right: 50%; width: ${half}%` : `left: 50%; width: ${half}%`;
    fill = el("div", { cls: value < 0 ? "fill negative" : "fill", style: side });
  } else {
    fill = el("div", { cls: "fill", style: `width: ${(value > 0 ? frac * 100 : 0).toFixed(1)}%` });
  }
  const track = el("div", { cls: signed ? "track signed" : "track" }, signed ? [el("div", { cls: "axis" }), fill] : [fill]);
  return el("div", Object.assign({ cls: `bar ${cls || ""}`.trim(), "data-key": key, "data-value": String(value) }, attrs || {}), [
    el("div", { cls: "key", text: key, title: key }),
    track,
    el("div", { cls: "val", text: fmt(value) }),
  ]);
}

// A row for an input the request did not give: no bar, the words "not given".
function absentBar(key, attrs) {
  return el("div", Object.assign({ cls: "bar modality absent", "data-key": key }, attrs || {}), [
    el("div", { cls: "key", text: key, title: key }),
    el("div", { cls: "track" }),
    el("div", { cls: "val", text: "not given" }),
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
// What each per-modality group of `explain` means, in words (shown under its title).
const CAPTIONS = {
  contribution: ["Contribution", "How much each input moves the prediction: the predicted class's probability with " +
    "all inputs minus without this one. Bars left of the axis argue against the prediction."],
  share: ["Share", "Each input's part of the total contribution (sizes only; the shares add up to 1)."],
  gates: ["Gates", "The fusion head's own weight for each input in this sample (they add up to 1)."],
  weights: ["Weights", "The fusion head's own weight for each input in this sample."],
  mix: ["Mix", "How the final prediction mixes the fused prediction and each input's own prediction."],
};

// Per-modality numbers: any {modality: number} dict the prediction carries (contributions, the head's gates...).
function modalityGroups(pred, modalities) {
  const groups = [];
  const keys = ["fused", ...modalities];
  const isModalityDict = (v) => v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length > 0
    && Object.entries(v).every(([k, x]) => keys.includes(k) && typeof x === "number");
  const visit = (prefix, obj) => {
    if (!obj || typeof obj !== "object") return;
    for (const [k, v] of Object.entries(obj)) {
      if (isModalityDict(v)) groups.push({ key: k, title: prefix ? `${prefix}: ${k}` : k, values: v });
      else if (v && typeof v === "object" && !Array.isArray(v) && !prefix) visit(k, v);
    }
  };
  visit("", pred.explain);
  for (const g of groups) {
    const [title, caption] = CAPTIONS[g.key] || [g.title, "The fusion head's own per-input values."];
    g.caption = caption;
    if (CAPTIONS[g.key]) g.title = title;
  }
  return groups;
}

function clearResult() {
  $("result").hidden = true;
  for (const id of ["pred-label", "pred-prob", "pred-inputs"]) $(id).textContent = "";
  $("class-bars").replaceChildren();
  $("modality-bars").replaceChildren();
}

function render(pred) {
  const m = state.model;
  const given = pred.inputs || [];
  $("result").hidden = false;
  const label = pred.label !== undefined ? pred.label : (pred.labels ? (pred.labels.join(", ") || "(none)") : "");
  $("pred-label").textContent = label;
  const top = pred.probs && pred.label !== undefined ? pred.probs[pred.label] : undefined;
  $("pred-prob").textContent = top !== undefined ? `${(100 * top).toFixed(1)}%` : "";
  $("pred-inputs").textContent = `from ${(pred.inputs || []).join(" + ") || "?"}`;
  const scores = pred.probs || pred.values || {};
  const entries = Object.entries(scores).sort((a, b) => b[1] - a[1]);
  const max = pred.probs ? 1 : Math.max(1e-12, ...entries.map(([, v]) => Math.abs(v)));
  const signedScores = entries.some(([, v]) => v < 0);
  $("class-bars").replaceChildren(...entries.map(([k, v], i) =>
    bar(k, v, max, i === 0 && pred.probs ? "top class" : "class", { "data-class": k }, signedScores)));
  const groups = modalityGroups(pred, m.modalities);
  const box = $("modality-bars");
  box.replaceChildren();
  if (!groups.length) box.appendChild(el("p", { cls: "muted", text: "this head reports no per-modality weights" }));
  for (const g of groups) {
    const shown = Object.entries(g.values).filter(([k]) => k === "fused" || given.includes(k));
    const vmax = Math.max(1e-12, ...shown.map(([, v]) => Math.abs(v)));
    const signed = shown.some(([, v]) => v < 0);
    const rows = [...("fused" in g.values ? ["fused"] : []), ...m.modalities].map((k) => {
      const attrs = { "data-modality": k, "data-group": g.key };
      return k !== "fused" && !given.includes(k) ? absentBar(k, attrs) : bar(k, g.values[k], vmax, "modality", attrs, signed);
    });
    box.appendChild(el("figure", { cls: "group", "data-group": g.key }, [
      el("figcaption", {}, [el("strong", { text: g.title }), el("span", { cls: "caption", text: ` ${g.caption}` })]),
      el("div", { cls: "bars" }, rows),
    ]));
  }
}

async function predict() {
  const m = state.model;
  const form = new FormData();
  const text = m.modalities.includes("text") ? $("text-input").value : "";
  if (text.trim()) form.append("text", text);
  for (const mod of ["image", "audio"]) if (state.files[mod]) form.append(mod, state.files[mod], state.files[mod].name);
  if (![...form.keys()].length) {
    clearResult();
    showError(`Give at least one input (${m.modalities.join(", ")}).`);
    return;
  }
  const size = [...form.values()].reduce((s, v) => s + (typeof v === "string" ? v.length : v.size), 0);
  if (size > m.limits.max_request_bytes) {
    clearResult();
    showError(`The inputs are ${(size / 1048576).toFixed(1)} MB; this server takes at most ${(m.limits.max_request_bytes / 1048576).toFixed(1)} MB.`);
    return;
  }
  showError("");
  clearResult();  // the old result never stays beside a new request's answer or error
  $("predict-btn").disabled = true;
  try {
    const resp = await fetch("/predict", { method: "POST", body: form });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `The server answered ${resp.status}.`;
      const retry = resp.headers.get("Retry-After");
      showError(`${detail.charAt(0).toUpperCase()}${detail.slice(1)}${retry ? ` Try again in ${retry} s.` : ""}`);
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
