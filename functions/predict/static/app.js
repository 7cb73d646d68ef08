// The predict function's web page. Plain JS, no dependencies. Every value from the server or
// the user is written with textContent / value / setAttribute, never innerHTML.
"use strict";

const GROUPS = [
  ["Demographics", ["race", "gender", "age", "weight", "payer_code", "medical_specialty"]],
  ["Admission", ["admission_type_id", "discharge_disposition_id", "admission_source_id",
    "time_in_hospital"]],
  ["Diagnoses", ["diag_1", "diag_2", "diag_3", "number_diagnoses"]],
  ["Labs", ["max_glu_serum", "A1Cresult", "num_lab_procedures"]],
  ["Medications", ["metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride",
    "acetohexamide", "glipizide", "glyburide", "tolbutamide", "pioglitazone", "rosiglitazone",
    "acarbose", "miglitol", "troglitazone", "tolazamide", "examide", "citoglipton", "insulin",
    "glyburide-metformin", "glipizide-metformin", "glimepiride-pioglitazone",
    "metformin-rosiglitazone", "metformin-pioglitazone", "change", "diabetesMed",
    "num_medications"]],
  ["Utilisation", ["num_procedures", "number_outpatient", "number_emergency",
    "number_inpatient"]],
];

const $ = (id) => document.getElementById(id);
let modelInfo = null;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function fieldId(column) { return "f-" + column.replace(/[^A-Za-z0-9_-]/g, "_"); }

function buildForm(info) {
  const groups = $("groups");
  groups.replaceChildren();
  const byColumn = new Map(info.inputs.map((spec) => [spec.column, spec]));
  const placed = new Set();
  const sections = GROUPS.map(([title, columns]) => [title, columns.filter((c) => byColumn.has(c))]);
  const rest = info.inputs.map((s) => s.column).filter((c) => !GROUPS.some(([, cs]) => cs.includes(c)));
  if (rest.length) sections.push(["Other", rest]);
  for (const [title, columns] of sections) {
    if (!columns.length) continue;
    const fieldset = el("fieldset");
    fieldset.append(el("legend", {}, title));
    const grid = el("div", { class: "fields" });
    for (const column of columns) {
      const spec = byColumn.get(column);
      placed.add(column);
      const label = el("label", { for: fieldId(column) }, column);
      label.append(field(spec));
      grid.append(label);
    }
    fieldset.append(grid);
    groups.append(fieldset);
  }
  fillExample(info);
}

// One input's control. A categorical input with known categories is a select of them plus
// "other / unknown" (value "": sent as null, i.e. missing, which the model accepts under
// either unknown-category policy); the missing marker "?" is that choice, not an option of
// its own. A numeric input is a number field with the range seen in training (min/max of
// /model-info, absent for older models) as min/max and as a visible hint; values outside it
// are still sent (the form is novalidate: the range is a hint, not a rule). The hint sits in
// the label, so it is part of the field's accessible name.
function field(spec) {
  const id = fieldId(spec.column);
  if (spec.kind !== "numeric" && Array.isArray(spec.categories)) {
    const select = el("select", { id, name: spec.column });
    for (const category of spec.categories) {
      if (category !== "?") select.append(el("option", { value: category }, category));
    }
    select.append(el("option", { value: "", "data-other": "true" }, "other / unknown"));
    select.dataset.kind = spec.kind;
    return select;
  }
  const input = el("input", { id, name: spec.column, autocomplete: "off" });
  input.dataset.kind = spec.kind;
  if (spec.kind === "numeric") {
    input.setAttribute("type", "number");
    input.setAttribute("step", "any");
    input.setAttribute("inputmode", "decimal");
    if (typeof spec.min === "number" && typeof spec.max === "number") {
      input.setAttribute("min", String(spec.min));
      input.setAttribute("max", String(spec.max));
      const hint = el("span", { id: id + "-range", class: "range" },
        "seen in training: " + fmt(spec.min) + "–" + fmt(spec.max));
      const wrap = document.createDocumentFragment();
      wrap.append(input, hint);
      return wrap;
    }
  }
  return input;
}

function fillExample(info) {
  for (const spec of info.inputs) {
    const input = $(fieldId(spec.column));
    const value = info.example ? info.example[spec.column] : null;
    input.value = value === null || value === undefined ? "" : String(value);
    // a select keeps no value it has no option for: then "other / unknown"
    if (input.tagName === "SELECT" && input.selectedIndex < 0) input.value = "";
  }
}

// The first number field holding text that is not a number (its value reads as ""), or null.
function badNumber(info) {
  const spec = info.inputs.find((s) => s.kind === "numeric" && $(fieldId(s.column)).validity.badInput);
  return spec ? spec.column : null;
}

function readForm(info) {
  const features = {};
  for (const spec of info.inputs) {
    const raw = $(fieldId(spec.column)).value.trim();
    if (raw === "") features[spec.column] = null;
    else if (spec.kind === "numeric" && Number.isFinite(Number(raw))) features[spec.column] = Number(raw);
    else features[spec.column] = raw;
  }
  return features;
}

function showError(body, status) {
  const box = $("error");
  const parts = [body && body.error ? body.error : "request failed (HTTP " + status + ")"];
  if (body && body.field) parts.push("Field: " + body.field);
  if (body && Array.isArray(body.allowed)) {
    const shown = body.allowed.slice(0, 25).join(", ");
    parts.push("Allowed: " + shown + (body.allowed.length > 25 ? ", …" : ""));
  }
  box.textContent = parts.join("\n");
  box.hidden = false;
  $("result").hidden = true;
  $("result-empty").hidden = true;
  if (body && body.field) {
    const input = document.getElementById(fieldId(body.field));
    if (input) input.setAttribute("aria-invalid", "true");
  }
}

function showResult(body, classes) {
  $("result-empty").hidden = true;
  $("result").hidden = false;
  $("result-class").textContent = body.readmission_prediction;
  $("result-version").textContent = body.model_version;
  const bars = $("bars");
  bars.replaceChildren();
  for (const name of classes) {
    const p = Number(body.probabilities[name]) || 0;
    const row = el("div", { class: "bar" + (name === body.readmission_prediction ? " top" : ""),
      "data-class": name, role: "listitem" });
    const track = el("div", { class: "track" });
    const fill = el("div", { class: "fill" });
    fill.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%";
    track.append(fill);
    row.append(el("span", { class: "name" }, name), track, el("span", { class: "value" }, (p * 100).toFixed(1) + " %"));
    bars.append(row);
  }
  const warnings = $("result-warnings");
  warnings.replaceChildren(...(body.warnings || []).map((w) => el("li", {}, w)));
  showFactors(body);
}

// Each factor: the input, its value, and how much replacing it by the training reference
// would take off each class's probability (occlusion; docs/predict.md, Explanations).
function showFactors(body) {
  const factors = (body.explanation && body.explanation.top_factors) || [];
  $("factors-title").hidden = factors.length === 0;
  $("result-factors").replaceChildren(...factors.map((f) => {
    const parts = Object.entries(f.contribution || {}).map(([name, delta]) => {
      const points = Number(delta) * 100;
      return (points >= 0 ? "+" : "") + points.toFixed(2) + " pts on " + name;
    });
    return el("li", { "data-feature": f.feature },
      f.feature + " = " + fmt(f.value) + ": " + parts.join(", "));
  }));
}

async function submit(event) {
  event.preventDefault();
  if (!modelInfo) return;
  $("error").hidden = true;
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const bad = badNumber(modelInfo);
  if (bad) {
    showError({ error: bad + " must be a number (or empty for missing)", field: bad }, 0);
    return;
  }
  $("submit").disabled = true;
  try {
    const response = await fetch("/predict?explain=true", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ features: readForm(modelInfo) }),
    });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (response.ok) showResult(body, modelInfo.classes);
    else showError(body, response.status);
  } catch (err) {
    showError({ error: "network error: " + err }, 0);
  } finally {
    $("submit").disabled = false;
  }
}

function fmt(value) {
  if (typeof value === "number") return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(4);
  return value === null || value === undefined ? "–" : String(value);
}

function buildCard(info) {
  const facts = $("card-facts");
  facts.replaceChildren();
  const rows = [["Model", info.name], ["Version", info.version], ["Algorithm", info.algorithm],
    ["Training rows", info.training_rows], ["Dataset", info.dataset_id],
    ["Selection metric", info.selection_metric], ["Registered", info.registered_at]];
  for (const [name, value] of rows) facts.append(el("dt", {}, name), el("dd", {}, fmt(value)));
  const metrics = info.metrics || {};
  const splits = Object.keys(metrics).filter((s) => metrics[s] && typeof metrics[s] === "object");
  const table = $("card-metrics");
  const head = el("tr");
  head.append(el("th", {}, "metric"), ...splits.map((s) => el("th", {}, s)));
  table.tHead.replaceChildren(head);
  const names = [...new Set(splits.flatMap((s) => Object.keys(metrics[s])))];
  table.tBodies[0].replaceChildren(...names.map((name) => {
    const tr = el("tr");
    tr.append(el("td", {}, name), ...splits.map((s) => el("td", {}, fmt(metrics[s][name]))));
    return tr;
  }));
  buildQuality(info);
  const img = $("learning-curve");
  if (info.learning_curve_png) {
    img.onload = () => { img.hidden = false; $("learning-curve-missing").hidden = true; };
    img.onerror = () => { img.hidden = true; $("learning-curve-missing").hidden = false; };
    img.src = info.learning_curve_png + "?v=" + encodeURIComponent(info.version);
  } else {
    $("learning-curve-missing").hidden = false;
  }
  const curve = Array.isArray(info.learning_curve) ? info.learning_curve : [];
  const curveTable = $("curve-table");
  if (curve.length) {
    const columns = Object.keys(curve[0]);
    const tr = el("tr");
    tr.append(...columns.map((c) => el("th", {}, c)));
    curveTable.tHead.replaceChildren(tr);
    curveTable.tBodies[0].replaceChildren(...curve.map((row) => {
      const r = el("tr");
      r.append(...columns.map((c) => el("td", {}, fmt(row[c]))));
      return r;
    }));
    curveTable.hidden = false;
  }
}

// Calibration, `<30` recall, flagged groups and the noise-aware selection (metadata.json).
function buildQuality(info) {
  const q = info.quality || {};
  const positive = q.positive_class || "<30";
  const split = (name) => q[name] || {};
  const eceTest = split("test").ece || {};
  facts($("card-quality"), [
    [`Recall of ${positive} (validation / test)`,
      `${fmt(split("validation").positive_recall)} / ${fmt(split("test").positive_recall)}`],
    ["Brier, mean of classes (validation / test)",
      `${fmt(split("validation").brier_mean)} / ${fmt(split("test").brier_mean)}`],
    ["ECE per class (test)",
      Object.keys(eceTest).map((c) => `${c} ${fmt(eceTest[c])}`).join(", ") || null],
  ]);
  const flagged = Array.isArray(q.flagged_groups) ? q.flagged_groups : [];
  $("card-flagged").replaceChildren(...(flagged.length ? flagged.map((g) => el("li", {},
    `${g.column} = ${g.group}: ${fmt(g.rows)} rows, ${positive} recall ${fmt(g.recall)} ` +
    `(overall ${fmt(g.overall_recall)})`)) : [el("li", {}, "None.")]));
  const s = info.selection;
  if (s && Array.isArray(s.selected_interval)) {
    const [low, high] = s.selected_interval;
    $("card-selection").textContent = `Selected ${s.selected} (leader by ${s.metric}: ` +
      `${s.leader}; ${s.tied.length} tied within noise). Difference from the leader: ` +
      `interval [${signed(low)}, ${signed(high)}]. Rule: ${s.rule}.`;
  }
}

// ---- the "Model" section: champion, pending challenger, last promotion decision ----------
function signed(value) {
  return typeof value === "number" ? (value >= 0 ? "+" : "") + value.toFixed(4) : fmt(value);
}

function facts(dl, rows) {
  dl.replaceChildren();
  for (const [name, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    const dd = el("dd");
    if (value instanceof Node) dd.append(value);
    else dd.textContent = String(value);
    dl.append(el("dt", {}, name), dd);
  }
}

function testScore(metrics, metric) {
  const test = metrics && metrics.test;
  return test && metric && typeof test[metric] === "number" ? test[metric] : null;
}

function compared(side) {
  // one model of a decision: "v2 · logistic_regression · 2,103 rows · corpus … · score 0.5712"
  if (!side || typeof side !== "object") return null;
  const parts = [];
  if (side.model_version !== undefined && side.model_version !== null) parts.push("v" + side.model_version);
  if (side.algorithm) parts.push(String(side.algorithm));
  if (typeof side.training_rows === "number") parts.push(fmt(side.training_rows) + " rows");
  if (side.corpus_version) parts.push("corpus " + side.corpus_version);
  if (typeof side.score === "number") parts.push("score " + fmt(side.score));
  return parts.join(" · ");
}

function buildGate(info) {
  const metric = info.selection_metric;
  facts($("gate-champion"), [["Version", info.version], ["Algorithm", info.algorithm],
    ["Training rows", fmt(info.training_rows)], ["Corpus version", info.dataset_id],
    ["Test " + (metric || "score"), testScore(info.metrics, metric) === null ? null : fmt(testScore(info.metrics, metric))]]);
  const challenger = info.challenger;
  $("gate-challenger").hidden = !challenger;
  $("gate-no-challenger").hidden = Boolean(challenger);
  if (challenger) {
    facts($("gate-challenger"), [["Version", challenger.version], ["Algorithm", challenger.algorithm],
      ["Training rows", fmt(challenger.training_rows)], ["Corpus version", challenger.corpus_version],
      ["Test " + (challenger.selection_metric || "score"),
        challenger.test_score === null ? null : fmt(challenger.test_score)]]);
  }
  const decision = info.last_decision;
  $("gate-decision").hidden = !decision;
  $("gate-no-decision").hidden = Boolean(decision);
  if (decision) {
    const verdict = el("span", { id: "gate-verdict", "data-verdict": String(decision.verdict) }, decision.verdict);
    const interval = Array.isArray(decision.interval) && decision.interval.length === 2
      ? "[" + decision.interval.map(signed).join(", ") + "]" +
        (decision.rule && typeof decision.rule.confidence === "number"
          ? " (" + Math.round(decision.rule.confidence * 100) + " %)" : "")
      : null;
    const after = decision.champion_after && decision.champion_after.model_version;
    facts($("gate-decision"), [["Verdict", verdict], ["Kind", decision.kind],
      ["Decided", decision.decided_at], ["Reason", decision.reason],
      ["Challenger", compared(decision.challenger)], ["Champion", compared(decision.champion)],
      ["Metric", decision.rule && decision.rule.metric],
      ["Difference", decision.difference === null || decision.difference === undefined ? null : signed(decision.difference)],
      ["Interval", interval],
      ["Test rows", typeof decision.rows === "number" ? fmt(decision.rows) : null],
      ["Champion after", after === null || after === undefined ? null : "v" + after]]);
  }
}

// ---- the latest drop's drift report (/model-info "drift") ----------------------------------
function buildDrift(info) {
  const drift = info.drift;
  $("drift-facts").hidden = !drift;
  $("drift-none").hidden = Boolean(drift);
  const table = $("drift-columns");
  const body = table.querySelector("tbody");
  body.replaceChildren();
  table.hidden = true;
  if (!drift) return;
  const status = el("span", { id: "drift-status", "data-status": String(drift.status) }, drift.status);
  const reference = drift.reference && drift.reference.model_version ? "v" + drift.reference.model_version : null;
  facts($("drift-facts"), [["Status", status], ["Summary", drift.message], ["Drop", drift.drop_id],
    ["Rows", typeof drift.rows === "number" ? fmt(drift.rows) : null], ["Against model", reference],
    ["Thresholds", drift.thresholds ? "watch > " + drift.thresholds.watch + ", drifted > " + drift.thresholds.drifted : null]]);
  for (const column of drift.top || []) {
    const row = el("tr", { "data-status": String(column.status) });
    row.append(el("td", {}, column.column), el("td", {}, Number(column.psi).toFixed(4)),
      el("td", {}, String(column.status)), el("td", {}, column.unseen === null || column.unseen === undefined ? "–" : fmt(column.unseen)));
    body.append(row);
  }
  table.hidden = !(drift.top && drift.top.length);
}

async function init() {
  $("patient-form").addEventListener("submit", submit);
  $("reset").addEventListener("click", () => modelInfo && fillExample(modelInfo));
  for (let attempt = 0; attempt < 60; attempt++) {
    try {
      const response = await fetch("/model-info");
      if (response.ok) {
        modelInfo = await response.json();
        buildForm(modelInfo);
        buildCard(modelInfo);
        buildGate(modelInfo);
        buildDrift(modelInfo);
        $("status").textContent = "Model " + modelInfo.name + " version " + modelInfo.version + " is ready.";
        $("submit").disabled = false;
        return;
      }
      $("status").textContent = "Waiting for the model (HTTP " + response.status + ")…";
    } catch (err) {
      $("status").textContent = "Cannot reach the server: " + err;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

document.addEventListener("DOMContentLoaded", init);
