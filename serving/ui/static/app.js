// The /ui page: posts the chosen image to POST /classify (multipart/form-data, the upload form)
// and draws the answer. Plain DOM + inline SVG; nothing is loaded from outside this server.
"use strict";

const here = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const api = (path) => new URL(path, location.origin + here).toString();
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let chosen = null; // {blob, name}
let model = null;

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(state, text) {
  $("output").dataset.state = state;
  $("status").textContent = text;
}

async function loadModel() {
  try {
    const r = await fetch(api("../model"));
    model = await r.json();
    const s = model.serving || {};
    const d = s.defaults || {};
    const sel = s.selective;
    $("model-info").textContent = `model ${model.name} · ${s.backend} backend · defaults: ` +
      `${d.solver}, max_iter ${d.max_iter}, tol ${d.tol}, settle ${d.settle_iters} / ` +
      `${d.settle_entropy} nats · selective: ` +
      (sel ? `${sel.score}, coverage ${sel.min_coverage} to 1` : "not calibrated (coverage 1 only)");
    if (sel) $("coverage").min = sel.min_coverage;
    $("max_iter").max = s.max_iter_cap || 100;
    for (const opt of $("solver").options) opt.disabled = opt.value && !(s.solvers || []).includes(opt.value);
    for (const opt of $("defense").options) opt.disabled = !(s.defenses || ["none"]).includes(opt.value);
  } catch (e) {
    $("model-info").textContent = "could not read /model: " + e;
  }
}

function choose(blob, name) {
  chosen = {blob, name};
  const img = $("preview");
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  $("classify").disabled = false;
  classify();
}

async function classify() {
  if (!chosen) return;
  const form = new FormData();
  form.append("image", chosen.blob, chosen.name);
  for (const name of ["max_iter", "solver", "defense", "deadline_ms", "settle_iters", "settle_entropy", "coverage"]) {
    const v = $(name).value.trim();
    if (v !== "" && !(name === "defense" && v === "none")) form.append(name, v);
  }
  setStatus("busy", `classifying ${chosen.name}…`);
  try {
    const r = await fetch(api("../classify"), {method: "POST", body: form});
    const body = await r.json();
    if (!r.ok) { setStatus("error", `${r.status}: ${body.error}`); return; }
    show(body);
    setStatus("done", `answer for ${chosen.name}`);
  } catch (e) {
    setStatus("error", "request failed: " + e);
  }
}

function show(a) {
  $("prediction").textContent = a.class_name;
  $("prediction").dataset.label = a.label;
  $("prediction").classList.toggle("abstained", !!a.abstained);
  $("prediction").title = a.abstained ? "abstained: the best guess, not an answer" : "";
  showSelective(a);
  const why = {tol: "converged (tol)", settled: "settled (anytime exit)",
               deadline: "deadline reached", budget: "server budget reached",
               max_iter: "max_iter reached"}[a.stopped] || a.stopped;
  $("summary").innerHTML = "";
  $("summary").append(`${a.iterations} iterations, stopped: `,
                      el("span", {class: a.stopped === "settled" ? "settled" : ""}, why),
                      `, p = ${Math.max(...a.probabilities).toFixed(3)}`);
  const det = a.detection;
  $("detection").innerHTML = "";
  const thr = det.threshold === null ? "not calibrated" : det.threshold.toFixed(4);
  $("detection").append(`detection ${det.score_name}: ${det.score.toFixed(4)} (threshold ${thr}) `,
                        el("span", {id: "suspicious", class: det.suspicious ? "suspicious" : ""},
                           det.suspicious ? "SUSPICIOUS" : "not suspicious"));
  drawBars(a);
  const entThreshold = det.threshold !== null && /entropy/.test(det.score_name || "") ? det.threshold : null;
  drawChart($("entropy-chart"), a.entropy, {log: false, line: entThreshold, lineClass: "threshold",
                                            lineLabel: "detection threshold"});
  const tol = (model && model.serving && model.serving.defaults) ? model.serving.defaults.tol : null;
  drawChart($("residual-chart"), a.residual, {log: true, line: tol, lineClass: "tol", lineLabel: "tol"});
}

// An abstained answer is shown as such: the flag, the doubt score over its threshold, and the
// prediction struck through as a best guess.
function showSelective(a) {
  const box = $("selective");
  box.innerHTML = "";
  const sel = a.selective || {coverage: 1};
  const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(4));
  if (sel.threshold === null || sel.threshold === undefined) {
    box.append(el("span", {id: "abstained", class: ""}, "answered"),
               ` (coverage ${sel.coverage}: always answer` +
               (sel.score_name ? `; doubt ${sel.score_name} ${fmt(sel.score)})` : ")"));
    return;
  }
  box.append(el("span", {id: "abstained", class: a.abstained ? "abstained-flag" : ""},
                a.abstained ? "ABSTAINED" : "answered"),
             ` at coverage ${sel.coverage}: doubt ${sel.score_name} ${fmt(sel.score)} ` +
             `${a.abstained ? ">" : "<="} threshold ${fmt(sel.threshold)}` +
             (a.abstained ? "; the prediction above is only a best guess" : ""));
}

function drawBars(a) {
  const box = $("probabilities");
  box.innerHTML = "";
  const names = (model && model.classes) || a.probabilities.map((_, i) => String(i));
  a.probabilities.forEach((p, i) => {
    const row = el("div", {class: "bar" + (i === a.label ? " top" : "")});
    row.append(el("span", {class: "name"}, names[i]),
               el("span", {class: "fill", style: `width:${Math.max(1, p * 240)}px`}),
               el("span", {}, p.toFixed(3)));
    box.append(row);
  });
}

function drawChart(svg, values, opt) {
  svg.innerHTML = "";
  const W = 480, H = 220, L = 48, R = 10, T = 10, B = 28;
  const tx = (v) => (opt.log ? Math.log10(Math.max(v, 1e-12)) : v);
  const ys = values.map(tx);
  const extra = opt.line !== null && opt.line !== undefined ? [tx(opt.line)] : [];
  let lo = Math.min(...ys, ...extra), hi = Math.max(...ys, ...extra);
  if (!opt.log) lo = Math.min(0, lo);
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const n = values.length;
  const px = (i) => L + (n <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const py = (y) => T + ((hi - y) * (H - T - B)) / (hi - lo);
  for (let k = 0; k <= 4; k++) {
    const y = lo + ((hi - lo) * k) / 4;
    svg.append(el("svg:line", {class: "grid", x1: L, x2: W - R, y1: py(y), y2: py(y)}));
    const label = opt.log ? Math.pow(10, y).toExponential(1) : y.toFixed(2);
    svg.append(el("svg:text", {x: 4, y: py(y) + 3}, label));
  }
  svg.append(el("svg:line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.append(el("svg:line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  const step = Math.max(1, Math.ceil(n / 10));
  for (let i = 0; i < n; i += step) svg.append(el("svg:text", {x: px(i) - 3, y: H - B + 14}, String(i + 1)));
  svg.append(el("svg:text", {x: W / 2 - 20, y: H - 2}, "iteration"));
  if (extra.length) {
    svg.append(el("svg:line", {class: opt.lineClass, x1: L, x2: W - R, y1: py(extra[0]), y2: py(extra[0])}));
    svg.append(el("svg:text", {x: W - R - 90, y: py(extra[0]) - 4}, opt.lineLabel));
  }
  svg.append(el("svg:polyline", {points: ys.map((y, i) => `${px(i)},${py(y)}`).join(" ")}));
  ys.forEach((y, i) => {
    const c = el("svg:circle", {class: "pt", cx: px(i), cy: py(y), r: 2.5});
    c.append(el("svg:title", {}, `iteration ${i + 1}: ${values[i].toPrecision(4)}`));
    svg.append(c);
  });
}

// The bundled examples, each shown for its role (index.json, made by bench/ui_examples.py
// running the served engine): clicking one sends the request its caption describes.
async function loadExamples() {
  const box = $("examples");
  box.innerHTML = "";
  const r = await fetch(api("examples/index.json"));
  const list = await r.json();
  for (const ex of list.examples) {
    const b = el("button", {type: "button", class: `role-${ex.role} ${ex.attacked ? "adv" : "clean"}`,
                            title: ex.caption, "data-file": ex.file, "data-role": ex.role});
    b.append(el("img", {src: api("examples/" + ex.file), alt: ex.caption}),
             el("span", {}, ex.title),
             el("span", {class: "kind"}, (ex.attacked ? "PGD " : "clean ") + ex.true_class));
    b.addEventListener("click", async () => {
      const coverage = (ex.request || {}).coverage;
      $("coverage").value = coverage === undefined ? "" : String(coverage);
      $("example-caption").textContent = ex.caption;
      const blob = await (await fetch(api("examples/" + ex.file))).blob();
      choose(blob, ex.file);
    });
    box.append(b);
  }
}

$("file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  $("example-caption").textContent = "";
  if (f) choose(f, f.name);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const f = e.dataTransfer.files[0];
  $("example-caption").textContent = "";
  if (f) choose(f, f.name);
});
$("options").addEventListener("submit", (e) => { e.preventDefault(); classify(); });
loadModel();
loadExamples().catch((e) => setStatus("error", "could not load examples: " + e));
