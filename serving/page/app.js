// pv-ray's web page: plain JavaScript over the HTTP API (no build step, nothing from a CDN).
"use strict";

const PAGE_SIZE = 20;
const $ = (id) => document.getElementById(id);
const state = { identity: null, pageStart: null, nextStart: null, job: null, key: sessionStorage.getItem("pv-ray-key") };

// Errors in words, by status: what the person can do about it.
const WORDS = {
  401: "This server needs an API key.",
  404: "Not found: that identity has no adapter (or the job is gone).",
  413: "The request is too large.",
  422: "The request is outside the server's limits",
  429: "The server is busy: too many videos are queued. Try again in a little while.",
  500: "The server could not use this identity's adapter.",
  503: "The server is busy, or its adapter store is unavailable.",
};

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = `Bearer ${state.key}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && !options.retried) {
    state.key = await askForKey();
    return api(path, Object.assign({}, options, { retried: true }));
  }
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    const words = WORDS[response.status] || `The server answered ${response.status}.`;
    const retry = response.headers.get("Retry-After");
    throw new Error(`${words}${typeof detail === "string" && detail ? `: ${detail}` : ""}${retry ? ` (retry after ${retry} s)` : ""}`);
  }
  return response;
}

function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    dialog.addEventListener("close", () => {
      const key = $("api-key").value.trim();
      sessionStorage.setItem("pv-ray-key", key);
      resolve(key);
    }, { once: true });
    dialog.showModal();
  });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadIdentities(start) {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  if (start) params.set("start_after", start);
  const filter = $("identity-filter").value.trim();
  if (filter) params.set("contains", filter);
  try {
    const page = await (await api(`v1/identities?${params}`)).json();
    state.pageStart = start;
    state.nextStart = page.next;
    const list = $("identities");
    list.replaceChildren(...page.identities.map((id) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = id;
      button.dataset.identity = id;
      button.setAttribute("role", "option");
      button.setAttribute("aria-selected", String(id === state.identity));
      button.addEventListener("click", () => choose(id));
      item.append(button);
      return item;
    }));
    if (!page.identities.length) list.innerHTML = "<li>No identity matches.</li>";
    $("next-page").disabled = !page.next;
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

function choose(identity) {
  state.identity = identity;
  $("chosen").textContent = identity === null ? "the base model" : identity;
  for (const button of document.querySelectorAll("#identities button")) {
    button.setAttribute("aria-selected", String(button.dataset.identity === identity));
  }
}

function showProgress(job) {
  const bar = $("progress");
  bar.hidden = false;
  bar.max = job.total_steps || 1;
  bar.value = job.step;
  const where = job.status === "queued" ? ` (position ${job.position} in the queue)` : "";
  const eta = job.eta_s ? `, about ${Math.round(job.eta_s)} s left` : "";
  $("progress-text").textContent = `${job.status}: step ${job.step} of ${job.total_steps}${where}${eta}`;
}

async function showVideo(job, format) {
  const data = await (await api(job.video_url)).blob();
  const url = URL.createObjectURL(data);
  $("video").hidden = format !== "mp4";
  $("gif").hidden = format !== "gif";
  if (format === "mp4") { $("video").src = url; $("video").dataset.source = job.video_url; }
  else { $("gif").src = url; $("gif").dataset.source = job.video_url; }
  $("download").href = url;
  $("download").download = `${state.identity || "base"}-${job.id}.${format}`;
  $("result").hidden = false;
}

async function follow(jobId, format) {
  while (state.job === jobId) {
    const job = await (await api(`v1/jobs/${jobId}`)).json();
    showProgress(job);
    if (job.status === "done") { await showVideo(job, format); break; }
    if (job.status === "failed") { showError(`The video could not be made: ${job.error}`); break; }
    if (job.status === "cancelled") { $("progress-text").textContent = "cancelled"; break; }
    await new Promise((r) => setTimeout(r, 500));
  }
  $("generate").disabled = false;
  $("cancel").hidden = true;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  $("result").hidden = true;
  const format = $("format").value;
  const body = { identity: state.identity, prompt: $("prompt").value, seed: Number($("seed").value), format };
  // An empty field is left out: the server's default (video.*) applies.
  if ($("frames").value) body.num_frames = Number($("frames").value);
  if ($("steps").value) body.num_inference_steps = Number($("steps").value);
  $("generate").disabled = true;
  try {
    const accepted = await (await api("v1/jobs", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    })).json();
    state.job = accepted.id;
    $("cancel").hidden = false;
    await follow(accepted.id, format);
  } catch (e) {
    showError(e.message);
    $("generate").disabled = false;
    $("cancel").hidden = true;
  }
}

async function cancel() {
  if (!state.job) return;
  try { await api(`v1/jobs/${state.job}`, { method: "DELETE" }); } catch (e) { showError(e.message); }
}

$("request").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("base-model").addEventListener("click", () => choose(null));
$("first-page").addEventListener("click", () => loadIdentities(null));
$("next-page").addEventListener("click", () => loadIdentities(state.nextStart));
let filterTimer = null;
$("identity-filter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => loadIdentities(null), 250);
});
// The server's defaults and limits (its config), then the identities.
async function loadDefaults() {
  try {
    const defaults = await (await api("v1/defaults")).json();
    $("frames").value = defaults.num_frames;
    $("frames").max = defaults.max_frames;
    $("steps").value = defaults.num_inference_steps;
    $("steps").max = defaults.max_steps;
  } catch (e) {
    showError(e.message);
  }
}
loadDefaults().then(() => loadIdentities(null));
