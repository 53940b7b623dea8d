// The page's only script (served as /app.js: the Content-Security-Policy allows no inline script).
// A server started with --token prints a link ending in #token=...; the token travels in a header.
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const authHeaders = () => (token ? {"Authorization": "Bearer " + token} : {});
const fmt = p => (100 * p).toFixed(1) + " %";
const bar = p => `<span class="bar"><span style="width:${(100 * p).toFixed(1)}%"></span></span> ${fmt(p)}`;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const corrections = {};  // the clinician's values for criteria: {BWV: "ABS", ...}; sent with every request
let last = null;         // the last answer, for redrawing

function formData() {
  const data = new FormData();
  for (const k of ["derm", "clinic"]) { const f = document.getElementById(k).files[0]; if (f) data.append(k, f); }
  for (const k of ["sex", "location", "elevation"]) { const v = document.getElementById(k).value; if (v) data.append(k, v); }
  for (const [k, v] of Object.entries(corrections)) data.append(k, v);
  return data;
}

async function analyse() {
  const err = document.getElementById("error"), btn = document.getElementById("submit");
  err.textContent = "";
  btn.disabled = true; btn.textContent = "Analysing…";
  try {
    const res = await fetch("/api/predict", {method: "POST", body: formData(), headers: authHeaders()});
    const body = await res.json();
    if (!res.ok) { err.textContent = body.error || ("error " + res.status); return; }
    last = body;
    render(body);
  } catch (e) { err.textContent = "request failed: " + e; }
  finally { btn.disabled = false; btn.textContent = "Analyse"; }
}

document.getElementById("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  for (const k of Object.keys(corrections)) delete corrections[k];  // a new analysis starts uncorrected
  analyse();
});

async function openReport() {
  const err = document.getElementById("error");
  const res = await fetch("/api/report", {method: "POST", body: formData(), headers: authHeaders()});
  if (!res.ok) { const body = await res.json(); err.textContent = body.error || ("error " + res.status); return; }
  const url = URL.createObjectURL(new Blob([await res.text()], {type: "text/html"}));
  const link = document.getElementById("report-link");
  link.href = url; link.hidden = false;
  window.open(url, "_blank");
}

function render(r) {
  const rows = Object.entries(r.tasks).map(([name, t]) => {
    const probs = Object.entries(t.probabilities).map(([c, p]) =>
      `<div><span class="cls${c === t.predicted ? " pred" : ""}">${esc(c)}</span> ${bar(p)}</div>`).join("");
    const set = r.sets ? r.sets[name].map(esc).join(" or ") : "–";
    let fix = "";
    if (name !== "DIAG") {  // a criterion: the clinician may give its value
      const opts = Object.keys(t.probabilities).map(c =>
        `<option value="${esc(c)}"${corrections[name] === c ? " selected" : ""}>${esc(c)}</option>`).join("");
      fix = `<select class="fix" data-task="${esc(name)}" aria-label="correct ${esc(name)}"><option value="">model</option>${opts}</select>`;
    }
    const given = name in r.corrections ? ` <span class="fixed">(clinician)</span>` : "";
    return `<tr class="task-row" data-task="${esc(name)}"><th>${esc(name)}</th><td class="pred">${esc(t.predicted)} <span class="muted">(${esc(t.predicted_name)})</span>${given}</td><td>${probs}</td><td class="set">${set}</td><td>${fix}</td></tr>`;
  }).join("");
  const maps = Object.entries(r.attention_overlays).map(([k, url]) =>
    `<figure><img src="${url}" alt="attention ${esc(k)}"><figcaption>${esc(k)}</figcaption></figure>`).join("");
  const used = Object.entries(r.inputs_used).map(([k, v]) => `${esc(k)}: ${v ? "used" : "not given"}`).join(" · ");
  const level = r.set_level ? `${Math.round(100 * r.set_level)} %` : "";
  const top = fmt(r.tasks.DIAG.probabilities[r.diagnosis]);
  const head = r.uncertain
    ? `<h2 class="uncertain" id="uncertain">Uncertain: <span id="diagnosis">${r.sets ? r.sets.DIAG.map(esc).join(" or ") : esc(r.diagnosis)}</span>${r.sets ? "" : ` <span class="muted">(${top})</span>`}</h2>
       <p class="muted" id="why">Because ${esc(r.uncertain_why)}; the most probable is ${esc(r.diagnosis)} (${esc(r.diagnosis_name)}, ${top}).</p>`
    : `<h2>Diagnosis: <span id="diagnosis">${esc(r.diagnosis)}</span> <span class="muted">(${esc(r.diagnosis_name)}, ${top})</span></h2>
       <p class="muted">${r.sets ? `The only diagnosis in its ${level} prediction set.` : "This model carries no prediction sets; an answer below 50 % would be marked uncertain."}</p>`;
  const fixed = Object.keys(r.corrections).length
    ? `<p id="corrections">Your corrections: ${Object.entries(r.corrections).map(([k, v]) => `${esc(k)} = ${esc(v)}`).join(", ")}; the score, the rule and the diagnosis (${esc(r.diagnosis_source)}) follow them.</p>` : "";
  document.getElementById("result").innerHTML = `
    ${r.ood_warning ? `<p class="error" id="ood-warning">Warning: this dermoscopy image looks unlike the images the model was trained on (out-of-distribution score ${r.ood_score.toFixed(1)} &gt; ${r.ood_threshold.toFixed(1)}). Treat the result with extra caution.</p>` : ""}
    ${head}
    <p>7-point score: <span class="score" id="score">${r.seven_point_score}</span>
      <span class="${r.melanoma_flag ? "flag" : "ok"}">${r.melanoma_flag ? `≥ ${r.melanoma_threshold}: suspicious for melanoma (checklist rule)` : `&lt; ${r.melanoma_threshold}: below the checklist's melanoma threshold`}</span></p>
    <p class="muted">${esc(r.score_rule)}. Melanoma probability: ${fmt(r.melanoma_probability)}.</p>
    <p class="muted" id="calibration">Probabilities: ${esc(r.calibration)}.</p>
    ${r.triage ? `<p class="${r.refer ? "flag" : "ok"}" id="triage">Melanoma triage: ${esc(r.triage_text)}.</p>` : `<p class="muted" id="triage">This model carries no melanoma referral point.</p>`}
    ${fixed}
    <table id="criteria"><thead><tr><th>task</th><th>prediction</th><th>probabilities</th><th>${level} set</th><th>your value</th></tr></thead><tbody>${rows}</tbody></table>
    <p><button type="button" id="report">Print / save report</button> <a id="report-link" hidden download="case-report.html">case-report.html</a></p>
    <h3>Where the model looked</h3><div class="maps">${maps || "<p class='muted'>no attention maps (attention off)</p>"}</div>
    <p class="muted">Inputs: ${used}. Branches: ${r.branches_used.map(esc).join(", ")}.</p>
    <p class="muted">${esc(r.notice)}</p>`;
  for (const sel of document.querySelectorAll("select.fix")) {
    sel.addEventListener("change", () => {
      if (sel.value) corrections[sel.dataset.task] = sel.value; else delete corrections[sel.dataset.task];
      analyse();
    });
  }
  document.getElementById("report").addEventListener("click", openReport);
}
