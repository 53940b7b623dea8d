// The page's only script (served as /app.js: the Content-Security-Policy allows no inline script).
// A server started with --token prints a link ending in #token=...; the token travels in a header.
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const authHeaders = () => (token ? {"Authorization": "Bearer " + token} : {});
const fmt = p => (100 * p).toFixed(1) + " %";
const bar = p => `<span class="bar"><span style="width:${(100 * p).toFixed(1)}%"></span></span> ${fmt(p)}`;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
document.getElementById("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const err = document.getElementById("error"), btn = document.getElementById("submit");
  err.textContent = "";
  const data = new FormData();
  for (const k of ["derm", "clinic"]) { const f = document.getElementById(k).files[0]; if (f) data.append(k, f); }
  for (const k of ["sex", "location", "elevation"]) { const v = document.getElementById(k).value; if (v) data.append(k, v); }
  btn.disabled = true; btn.textContent = "Analysing…";
  try {
    const res = await fetch("/api/predict", {method: "POST", body: data, headers: authHeaders()});
    const body = await res.json();
    if (!res.ok) { err.textContent = body.error || ("error " + res.status); return; }
    render(body);
  } catch (e) { err.textContent = "request failed: " + e; }
  finally { btn.disabled = false; btn.textContent = "Analyse"; }
});
function render(r) {
  const rows = Object.entries(r.tasks).map(([name, t]) => {
    const probs = Object.entries(t.probabilities).map(([c, p]) =>
      `<div><span class="cls${c === t.predicted ? " pred" : ""}">${esc(c)}</span> ${bar(p)}</div>`).join("");
    return `<tr class="task-row" data-task="${esc(name)}"><th>${esc(name)}</th><td class="pred">${esc(t.predicted)} <span class="muted">(${esc(t.predicted_name)})</span></td><td>${probs}</td></tr>`;
  }).join("");
  const maps = Object.entries(r.attention_overlays).map(([k, url]) =>
    `<figure><img src="${url}" alt="attention ${esc(k)}"><figcaption>${esc(k)}</figcaption></figure>`).join("");
  const used = Object.entries(r.inputs_used).map(([k, v]) => `${esc(k)}: ${v ? "used" : "not given"}`).join(" · ");
  document.getElementById("result").innerHTML = `
    ${r.ood_warning ? `<p class="error" id="ood-warning">Warning: this dermoscopy image looks unlike the images the model was trained on (out-of-distribution score ${r.ood_score.toFixed(1)} &gt; ${r.ood_threshold.toFixed(1)}). Treat the result with extra caution.</p>` : ""}
    <h2>Diagnosis: <span id="diagnosis">${esc(r.diagnosis)}</span> <span class="muted">(${esc(r.diagnosis_name)})</span></h2>
    <p>7-point score: <span class="score" id="score">${r.seven_point_score}</span>
      <span class="${r.melanoma_flag ? "flag" : "ok"}">${r.melanoma_flag ? `≥ ${r.melanoma_threshold}: suspicious for melanoma (checklist rule)` : `&lt; ${r.melanoma_threshold}: below the checklist's melanoma threshold`}</span></p>
    <p class="muted">${esc(r.score_rule)}. Melanoma probability from the diagnosis head: ${fmt(r.melanoma_probability)}.</p>
    <table id="criteria"><thead><tr><th>task</th><th>prediction</th><th>probabilities</th></tr></thead><tbody>${rows}</tbody></table>
    <h3>Where the model looked</h3><div class="maps">${maps || "<p class='muted'>no attention maps (attention off)</p>"}</div>
    <p class="muted">Inputs: ${used}. Branches: ${r.branches_used.map(esc).join(", ")}.</p>
    <p class="muted">${esc(r.notice)}</p>`;
}
