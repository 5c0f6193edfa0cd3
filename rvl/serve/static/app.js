// rvl serve page: talks only to the JSON API of this server (see /openapi.json). No framework, no build step.
"use strict";

const VIEWS = ["auto", "PA", "AP", "LATERAL", "LL", "OTHER"];
const state = {
  token: sessionStorage.getItem("rvl-token") || null,
  files: [],          // File objects of the study being uploaded
  study: null,        // {upload_id} or {study_id} of the current study
  labels: [],
  activeFinding: null,
  busy: 0,
};
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "width") node.style.width = value;  // CSSOM, allowed by the page's content security policy
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// ------------------------------------------------------------------------------------------------ messages, busy
function showMessage(text, kind = "error") {
  const box = el("div", {class: `message ${kind}`, role: kind === "error" ? "alert" : "status"},
    el("span", {}, text), el("button", {title: "dismiss", onclick: () => box.remove()}, "×"));
  $("messages").append(box);
  if (kind !== "error") setTimeout(() => box.remove(), 8000);
}
function clearMessages() { $("messages").querySelectorAll(".message.error").forEach((m) => m.remove()); }

async function busy(text, work) {
  state.busy += 1;
  $("busy-text").textContent = text;
  $("busy").hidden = false;
  $("progress").hidden = false;
  document.body.setAttribute("aria-busy", "true");
  try {
    return await work();
  } catch (err) {
    if (err.name !== "AuthError") showMessage(err.message);
    return null;
  } finally {
    state.busy -= 1;
    if (state.busy === 0) {
      $("busy").hidden = true;
      $("progress").hidden = true;
      document.body.removeAttribute("aria-busy");
    }
  }
}

// ------------------------------------------------------------------------------------------------------- API
function detailText(body, status) {
  if (!body || body.detail === undefined) return `the server answered ${status}`;
  if (typeof body.detail === "string") return body.detail;
  if (Array.isArray(body.detail)) {  // FastAPI validation errors
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
  }
  return JSON.stringify(body.detail);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, {headers}));
  } catch (err) {
    throw new Error(`cannot reach the rvl server (${err.message}); is it still running?`);
  }
  if (response.status === 401) {
    $("token-form").hidden = false;
    const err = new Error("this server needs its access token");
    err.name = "AuthError";
    showMessage("Enter the server's access token to continue.", "warning");
    throw err;
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    const err = new Error(detailText(body, response.status));
    err.status = response.status;
    throw err;
  }
  return options.raw ? response : response.json();
}

const imageUrls = new Map();  // API image path -> object URL (images need the token header, so no plain <img src>)
async function imageUrl(path) {
  if (!imageUrls.has(path)) {
    const response = await api(path, {raw: true});
    imageUrls.set(path, URL.createObjectURL(await response.blob()));
  }
  return imageUrls.get(path);
}
function apiImage(path, alt, cls) {
  const img = el("img", {alt, class: cls || null});
  imageUrl(path).then((url) => { img.src = url; }).catch((err) => {
    img.replaceWith(el("span", {class: "empty"}, `image unavailable: ${err.message}`));
  });
  return img;
}

// The current study as form fields: a cached upload id or an archive study id (files only for the first upload).
function studyForm(extra = {}, withFiles = false) {
  const form = new FormData();
  if (withFiles || !state.study) {
    state.files.forEach((f) => form.append("files", f.file, f.file.name));
    state.files.forEach((f) => form.append("views", f.view === "auto" ? "" : f.view));
  } else if (state.study.study_id) {
    form.append("study_id", state.study.study_id);
  } else {
    form.append("upload_id", state.study.upload_id);
  }
  if (withFiles || (state.study && state.study.upload_id)) {
    if ($("patient-id").value.trim()) form.append("patient_id", $("patient-id").value.trim());
    if ($("study-date").value) form.append("study_date", $("study-date").value);
  }
  for (const [key, value] of Object.entries(extra)) form.append(key, value);
  return form;
}

async function postStudy(path, extra = {}) {
  try {
    return await api(path, {method: "POST", body: studyForm(extra)});
  } catch (err) {  // the server forgot the upload (cache full or restarted): send the files again
    if (err.status === 404 && state.study && state.study.upload_id && state.files.length) {
      return api(path, {method: "POST", body: studyForm(extra, true)});
    }
    throw err;
  }
}

// ------------------------------------------------------------------------------------------------------- health
async function loadHealth() {
  const health = await busy("connecting", () => api("/api/health"));
  if (!health) return;
  $("token-form").hidden = true;
  const info = $("server-info");
  info.replaceChildren(el("span", {class: "chip"}, `model ${health.model.name} · ${health.model.embed_dim}-d`));
  const index = health.index;
  if (index && index.loaded) info.append(el("span", {class: "chip"}, `${index.count} archive studies`));
  else if (index) info.append(el("span", {class: "chip bad"}, "study index unusable"));
  else info.append(el("span", {class: "chip"}, "no study index"));
  const reports = health.reports_index;
  if (reports && reports.loaded) info.append(el("span", {class: "chip"}, `${reports.count} reports vote`));
  else if (reports) info.append(el("span", {class: "chip bad"}, "report index unusable"));
  if (index && !index.loaded) showMessage(`Similar-study search is off: ${index.error}`);
  if (reports && !reports.loaded) showMessage(`The kNN vote is off: ${reports.error}`);
  state.labels = health.labels;
  state.hasIndex = Boolean(index && index.loaded);
  if (!state.hasIndex) {
    $("results").replaceChildren(el("p", {class: "empty"}, index ? "Similar-study search is off (see the message " +
      "above)." : "No study index: start rvl serve with --index to find similar studies."));
    document.querySelectorAll("#search-form button, #search-text").forEach((node) => { node.disabled = true; });
  }
  renderFindings(null);
}

// ------------------------------------------------------------------------------------------------------- upload
function setFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  state.files = files.map((file) => ({file, view: guessView(file.name)}));
  renderFileList();
  $("analyze").disabled = false;
}
function guessView(name) {
  const upper = name.toUpperCase();
  if (/(^|[^A-Z])(LAT|LATERAL|LL)([^A-Z]|$)/.test(upper)) return "LATERAL";
  if (/(^|[^A-Z])PA([^A-Z]|$)/.test(upper)) return "PA";
  if (/(^|[^A-Z])AP([^A-Z]|$)/.test(upper)) return "AP";
  return "auto";
}
function renderFileList() {
  $("file-list").replaceChildren(...state.files.map((entry) => {
    const select = el("select", {title: "view position (auto: DICOM ViewPosition)",
      onchange: (e) => { entry.view = e.target.value; }},
      VIEWS.map((v) => el("option", {value: v, selected: v === entry.view ? "selected" : null}, v)));
    return el("li", {}, el("span", {title: entry.file.name}, entry.file.name), select);
  }));
}

async function analyzeUpload() {
  clearMessages();
  state.study = null;
  const result = await busy("reading and embedding the study", () =>
    api("/api/zeroshot", {method: "POST", body: studyForm({}, true)}));
  if (!result) return;
  state.study = {upload_id: result.study.upload_id};
  if (result.study.patient_id && !$("patient-id").value) $("patient-id").value = result.study.patient_id;
  if (result.study.study_date && !$("study-date").value) $("study-date").value = result.study.study_date;
  showStudy(result, null);
  await findSimilar();
}

async function openArchiveStudy(studyId) {
  clearMessages();
  const record = await busy(`opening study ${studyId}`, () => api(`/api/study/${encodeURIComponent(studyId)}`));
  if (!record) return;
  state.study = {study_id: studyId};
  state.files = [];  // the upload form is for new studies; an archive study brings its own patient and date
  renderFileList();
  $("analyze").disabled = true;
  $("patient-id").value = "";
  $("study-date").value = "";
  const result = await busy("zero-shot", () => postStudy("/api/zeroshot"));
  if (!result) return;
  showStudy(result, record);
  window.scrollTo({top: 0, behavior: "smooth"});
  await findSimilar();
}

function showStudy(result, record) {
  state.activeFinding = null;
  state.patientId = result.study.patient_id;
  $("heatmap-title").textContent = "";
  $("heat-legend").hidden = true;
  const study = result.study;
  const info = $("study-info");
  const who = [study.study_id ? `archive study ${study.study_id}` : "uploaded study",
    study.patient_id ? `patient ${study.patient_id}` : "no patient id", study.study_date || "no date"];
  info.replaceChildren(el("div", {}, who.join(" · ")));
  if (record && record.report) info.append(el("div", {class: "report"}, record.report));
  renderViews(study.views);
  renderFindings(result);
  $("prompt-text").disabled = false;
  $("prompt-button").disabled = false;
  $("apply-filters").disabled = !state.hasIndex;
}

function renderViews(views) {
  $("views").replaceChildren(...views.map((v) => el("figure", {class: "view", "data-index": v.index},
    apiImage(v.image, `${v.view} view`, "radiograph"),
    el("figcaption", {}, `${v.view} · ${v.name}${v.in_study_embedding ? "" : " (not in the study embedding)"}`))));
}

// ------------------------------------------------------------------------------------------------------ findings
function renderFindings(result) {
  const body = $("findings").querySelector("tbody");
  const labels = result ? result.labels : state.labels;
  const knn = result && result.knn;
  $("knn-legend").hidden = !knn;
  if (knn) $("knn-k").textContent = result.knn_k;
  body.replaceChildren(...labels.map((label) => {
    const p = result ? result.prompt[label] : null;
    const q = knn && label in knn ? knn[label] : null;
    const bars = el("div", {class: "bars"},
      el("div", {class: "bar", title: "prompt zero-shot"}, el("i", {width: `${100 * (p || 0)}%`})),
      q === null ? null : el("div", {class: "bar knn", title: "kNN vote"}, el("i", {width: `${100 * q}%`})));
    const row = el("tr", {class: "finding", "data-label": label, tabindex: result ? 0 : null,
      title: result ? `show where "${label}" is` : null},
      el("td", {class: "name"}, label), el("td", {}, bars),
      el("td", {class: "value"}, p === null ? "–" : p.toFixed(2),
        q === null ? null : el("span", {class: "knn"}, q.toFixed(2))));
    if (result) {
      row.addEventListener("click", () => showHeatmap(label));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") showHeatmap(label); });
    }
    return row;
  }));
}

async function showHeatmap(prompt) {
  if (!state.study) return;
  clearMessages();
  const result = await busy(`mapping "${prompt}"`, () => postStudy("/api/heatmap", {prompt}));
  if (!result) return;
  state.activeFinding = prompt;
  document.querySelectorAll(".finding").forEach((row) => row.classList.toggle("active", row.dataset.label === prompt));
  $("heatmap-title").textContent = `· “${result.prompt}” p = ${result.probability.toFixed(2)}`;
  $("heat-legend").hidden = !$("show-heatmap").checked;
  for (const view of result.views) {
    const figure = document.querySelector(`.view[data-index="${view.index}"]`);
    if (!figure) continue;
    figure.querySelector("img.heatmap")?.remove();
    const overlay = el("img", {class: "heatmap", src: view.image, alt: `heatmap of ${result.prompt}`});
    overlay.hidden = !$("show-heatmap").checked;
    figure.insertBefore(overlay, figure.querySelector("figcaption"));
  }
}

// ------------------------------------------------------------------------------------------------------ retrieval
function filterFields() {
  const fields = {k: $("k").value || "8", exclude_patient: $("exclude-patient").checked,
    priors_only: $("priors-only").checked};
  if ($("date-from").value) fields.date_from = $("date-from").value;
  if ($("date-to").value) fields.date_to = $("date-to").value;
  return fields;
}

async function findSimilar() {
  if (!state.study || !state.hasIndex) return;
  $("results-title").textContent = "4 · Similar archive studies";
  const result = await busy("searching similar studies", () => postStudy("/api/similar", filterFields()));
  renderResults(result ? result.results : null, result ? "No archive study passes these filters." : null);
}

async function searchText(text) {
  clearMessages();
  const fields = filterFields();
  const body = {text, k: Number(fields.k)};
  if (fields.date_from) body.date_from = fields.date_from;
  if (fields.date_to) body.date_to = fields.date_to;
  const result = await busy("searching the archive", () => api("/api/search", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)}));
  if (!result) return;
  $("results-title").textContent = `Studies matching “${result.text}”`;
  renderResults(result.results, "No archive study matches within these dates.");
}

function renderResults(hits, emptyText) {
  const box = $("results");
  if (hits === null) return;
  if (!hits.length) {
    box.replaceChildren(el("p", {class: "empty"}, emptyText));
    return;
  }
  box.replaceChildren(...hits.map((hit) => {
    const summary = hit.summary || hit.report || "(no report)";
    const report = el("div", {class: "report"}, summary);
    const samePatient = state.patientId && hit.patient_id === state.patientId;
    return el("article", {class: "hit", "data-study-id": hit.study_id},
      el("div", {class: "thumb"},
        hit.thumbnail ? apiImage(`${hit.thumbnail}?size=320`, `study ${hit.study_id}`) : null),
      el("div", {class: "body"},
        el("div", {class: "top"}, el("strong", {}, `#${hit.rank} ${hit.study_id}`),
          el("span", {class: "score", title: "cosine similarity"}, hit.score.toFixed(3))),
        el("div", {class: "meta"}, `patient ${hit.patient_id ?? "?"} · ${hit.study_date || "no date"} · ` +
          `${(hit.views || []).join("/")}`, samePatient ? el("span", {class: "badge"}, "same patient") : null),
        report,
        el("div", {class: "actions"},
          el("button", {type: "button", onclick: (e) => {
              const open = !report.classList.contains("open");
            report.classList.toggle("open", open);
            report.textContent = open ? (hit.report || summary) : summary;
            e.target.textContent = open ? "Less" : "Full report";
          }}, "Full report"),
          el("button", {type: "button", class: "open-study", onclick: () => openArchiveStudy(hit.study_id)},
            "Open study"))));
  }));
}

// ------------------------------------------------------------------------------------------------------- wiring
function init() {
  const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
  if (hashToken) {  // a #token=... link: keep it for this tab, drop it from the address bar
    state.token = hashToken;
    sessionStorage.setItem("rvl-token", hashToken);
    history.replaceState(null, "", location.pathname);
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value;
    sessionStorage.setItem("rvl-token", state.token);
    clearMessages();
    loadHealth();
  });
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => {
    setFiles(e.target.files);
    e.target.value = "";  // the next choice replaces this one instead of adding to it
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
  $("analyze").addEventListener("click", analyzeUpload);
  $("prompt-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt-text").value.trim();
    if (text) showHeatmap(text);
  });
  $("show-heatmap").addEventListener("change", (e) => {
    document.querySelectorAll("img.heatmap").forEach((img) => { img.hidden = !e.target.checked; });
    $("heat-legend").hidden = !e.target.checked || !document.querySelector("img.heatmap");
  });
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); findSimilar(); });
  $("exclude-patient").addEventListener("change", (e) => { if (e.target.checked) $("priors-only").checked = false; });
  $("priors-only").addEventListener("change", (e) => { if (e.target.checked) $("exclude-patient").checked = false; });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("search-text").value.trim();
    if (text) searchText(text);
    else showMessage("Type a description to search for, e.g. 'large right pleural effusion'.", "warning");
  });
  loadHealth();
}
document.addEventListener("DOMContentLoaded", init);
