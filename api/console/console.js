// The console: polls the server's JSON routes with the tab's API key and draws them.
// Every number shown comes from the server; every error shown is the server's message.
"use strict";

const ENGINE_EVERY_MS = 1000;
const LISTS_EVERY_MS = 5000;
const KEY_ITEM = "loraserve-api-key";

const $ = id => document.getElementById(id);
const state = { key: null, session: null, charts: null, lossChart: null, lastTokens: null, selectedJob: null,
                timers: [] };

class ServerError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : `${response.status} ${text}`;
    throw new ServerError(response.status, message);
  }
  return body;
}

// -- formatting ----------------------------------------------------------------------------
const ms = s => (s === null || s === undefined) ? "–" : `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
const triple = q => q.p50 === null ? "–" : `${ms(q.p50)} / ${ms(q.p90)} / ${ms(q.p99)}`;

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return new Date(t * 1000).toLocaleString();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function bar(done, total) {
  const meter = document.createElement("progress");
  meter.max = Math.max(total, 1);
  meter.value = done;
  return meter;
}

// -- sign in -------------------------------------------------------------------------------
async function signIn(key) {
  state.key = key || null;
  try {
    state.session = await api("/ui/api/session");
  } catch (e) {
    state.key = null;
    sessionStorage.removeItem(KEY_ITEM);
    showLogin(key || e.status !== 401 ? e.message : "");   // no key yet: just ask for one
    return;
  }
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  showConsole();
}

function showLogin(message) {
  state.timers.forEach(clearInterval);
  state.timers = [];
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

function showConsole() {
  const s = state.session;
  $("login").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = !s.keys_required;
  $("model").textContent = s.model;
  $("who").textContent = s.admin ? `${s.tenant} (admin: every tenant)` : `tenant ${s.tenant}`;
  $("upload-shared-label").hidden = !s.admin;
  if (!state.charts) state.charts = makeCharts();
  const every = (fn, period) => { fn(); state.timers.push(setInterval(fn, period)); };
  every(refreshEngine, ENGINE_EVERY_MS);
  every(refreshAdapters, LISTS_EVERY_MS);
  every(refreshJobs, LISTS_EVERY_MS);
  every(refreshBatches, LISTS_EVERY_MS);
}

// -- engine --------------------------------------------------------------------------------
function makeCharts() {
  return {
    requests: new RollingChart($("chart-requests"), "requests", ["running", "waiting"]),
    memory: new RollingChart($("chart-memory"), "occupancy %", ["KV blocks", "adapter slots"]),
    latency: new RollingChart($("chart-latency"), "latency p90 (ms)", ["TTFT", "ITL"]),
    throughput: new RollingChart($("chart-throughput"), "tokens/s", ["generated", "prompt (at finish)"]),
  };
}

async function refreshEngine() {
  let e;
  try {
    e = await api("/ui/api/engine");
  } catch (err) {
    if (err.status === 401) return showLogin(err.message);
    $("engine-updated").textContent = `not updated: ${err.message}`;
    return;
  }
  const r = e.requests, kv = e.kv_blocks, slots = e.slots, hits = e.adapters.tier_hits;
  $("fig-running").textContent = r.running;
  $("fig-waiting").textContent = r.waiting + (r.api_queued ? ` (+${r.api_queued} queued)` : "");
  $("fig-kv").textContent = `${kv.used} / ${kv.total}`;
  $("fig-slots").textContent = `${slots.used} / ${slots.total} (${slots.pinned} pinned)`;
  $("fig-ttft").textContent = triple(e.ttft_s);
  $("fig-itl").textContent = triple(e.itl_s);
  $("fig-tiers").textContent = `${hits.device} / ${hits.cpu} / ${hits.disk}`;
  $("fig-load").textContent = ms(e.adapters.disk_load_mean_s);
  const window = e.ttft_s.window_s === null ? "since start" : `last ${Math.round(e.ttft_s.window_s)} s`;
  const updated = new Date(e.time * 1000).toLocaleTimeString();
  $("engine-updated").textContent = `percentiles over the ${window}; updated ${updated}`;

  const last = state.lastTokens;
  let rate = [null, null];
  if (last && e.time > last.time) {
    const dt = e.time - last.time;
    rate = [(e.tokens.generated - last.generated) / dt, (e.tokens.prompt - last.prompt) / dt];
    $("fig-throughput").textContent = rate[0].toFixed(1);
  }
  state.lastTokens = { time: e.time, generated: e.tokens.generated, prompt: e.tokens.prompt };
  const pct = (a, b) => b ? 100 * a / b : 0;
  const c = state.charts;
  c.requests.push(e.time, [r.running, r.waiting]);
  c.memory.push(e.time, [pct(kv.used, kv.total), pct(slots.used, slots.total)]);
  c.latency.push(e.time, [e.ttft_s.p90 === null ? null : e.ttft_s.p90 * 1000,
                          e.itl_s.p90 === null ? null : e.itl_s.p90 * 1000]);
  c.throughput.push(e.time, rate);
}

// -- adapters ------------------------------------------------------------------------------
async function refreshAdapters() {
  let list;
  try {
    list = await api("/ui/api/adapters");
  } catch (err) {
    if (err.status === 401) return showLogin(err.message);
    return;
  }
  const body = $("adapter-table").tBodies[0];
  body.replaceChildren();
  for (const a of list.data) {
    const row = body.insertRow();
    row.dataset.ref = a.ref;
    cell(row, a.name + (a.shared ? " (shared)" : ""), "name");
    cell(row, a.owner);
    cell(row, a.latest ? `${a.version} (latest)` : `${a.version}`);
    cell(row, a.tier, `tier tier-${a.tier}`);
    cell(row, a.rank);
    cell(row, bytes(a.bytes));
    cell(row, a.requests);
    cell(row, `${a.prompt_tokens} / ${a.generated_tokens}`);
    cell(row, ago(a.last_used));
    const actions = row.insertCell();
    if (a.deletable) {
      const button = document.createElement("button");
      button.textContent = "Delete";
      button.className = "delete";
      button.addEventListener("click", () => confirmDelete(a));
      actions.append(button);
    }
  }
  $("adapters-empty").hidden = list.data.length > 0;
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("upload-name").value.trim());
  if ($("upload-shared").checked) form.append("shared", "true");
  // Only the files picked: the server names what is missing.
  for (const id of ["upload-config", "upload-model"]) {
    const input = $(id);
    if (input.files.length) form.append(input.name, input.files[0], input.files[0].name);
  }
  const message = $("upload-message");
  message.className = "";
  message.textContent = "Uploading…";
  try {
    const a = await api("/v1/adapters", { method: "POST", body: form });
    message.textContent = `Registered ${a.id} version ${a.version} (rank ${a.rank}).`;
    message.className = "ok";
    $("upload-form").reset();
  } catch (err) {
    message.textContent = err.message;
    message.className = "error";
  }
  refreshAdapters();
}

function confirmDelete(a) {
  const dialog = $("confirm-delete");
  $("confirm-what").textContent = `${a.owner}/${a.name} version ${a.version}`;
  dialog.onclose = async () => {
    if (dialog.returnValue !== "delete") return;
    const message = $("upload-message");
    try {
      const path = a.ref.split("/").map(encodeURIComponent).join("/");
      await api(`/v1/adapters/${path}`, { method: "DELETE" });
      message.textContent = `Deleted ${a.owner}/${a.name} version ${a.version}.`;
      message.className = "ok";
    } catch (err) {
      message.textContent = err.message;
      message.className = "error";
    }
    refreshAdapters();
  };
  dialog.showModal();
}

// -- fine-tuning jobs and batches --------------------------------------------------------------
async function refreshJobs() {
  const note = $("jobs-note");
  let jobs;
  try {
    jobs = (await api("/v1/fine_tuning/jobs?limit=20")).data;
  } catch (err) {
    note.textContent = err.message;
    return;
  }
  note.textContent = jobs.length ? "Click a job for its loss curve." : "No fine-tuning jobs for this tenant.";
  if (!state.selectedJob && jobs.length) state.selectedJob = jobs[0].id;
  const body = $("job-table").tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const row = body.insertRow();
    row.className = job.id === state.selectedJob ? "selected" : "";
    row.addEventListener("click", () => { state.selectedJob = job.id; refreshJobs(); });
    cell(row, job.id);
    cell(row, job.status, `status-${job.status}`);
    cell(row, job.fine_tuned_model || job.user_provided_suffix || "–");
    row.insertCell().id = `progress-${job.id}`;
    row.insertCell().id = `loss-${job.id}`;
  }
  await Promise.all(jobs.map(job => showProgress(job.id, job.id === state.selectedJob)));
}

// A job's newest step and loss from its events; its whole loss curve when it is the one selected.
async function showProgress(jobId, withCurve) {
  let events;
  try {
    const limit = withCurve ? 10000 : 50;
    events = (await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=${limit}`)).data;
  } catch (err) {
    return;
  }
  const metrics = events.filter(e => e.type === "metrics").reverse();   // oldest first
  const last = metrics[metrics.length - 1];
  const progress = $(`progress-${jobId}`), loss = $(`loss-${jobId}`);
  if (last && progress) {
    progress.append(bar(last.data.step, last.data.total_steps), ` ${last.data.step}/${last.data.total_steps}`);
  }
  const lastTrain = metrics.map(e => e.data.train_loss).filter(v => v !== undefined).pop();
  if (loss) loss.textContent = lastTrain === undefined ? "–" : lastTrain.toFixed(4);
  if (!withCurve) return;
  const chart = $("chart-loss");
  chart.hidden = false;
  if (!state.lossChart) state.lossChart = new LineChart(chart, "loss by step", "step", ["train", "held-out"]);
  $("loss-title").textContent = `Loss of ${jobId}`;
  state.lossChart.show([metrics.map(e => e.data.step), metrics.map(e => e.data.train_loss ?? null),
                        metrics.map(e => e.data.valid_loss ?? null)]);
  chart.dataset.job = jobId;
  chart.dataset.points = metrics.length;   // what the tests compare with the job's events
}

async function refreshBatches() {
  const note = $("batches-note");
  let batches;
  try {
    batches = (await api("/v1/batches?limit=20")).data;
  } catch (err) {
    note.textContent = err.status === 404 ? "This server has no batch API (/v1/batches)." : err.message;
    return;
  }
  note.textContent = batches.length ? "" : "No batches for this tenant.";
  const body = $("batch-table").tBodies[0];
  body.replaceChildren();
  for (const b of batches) {
    const row = body.insertRow();
    const counts = b.request_counts || { completed: 0, failed: 0, total: 0 };
    cell(row, b.id);
    cell(row, b.status, `status-${b.status}`);
    row.insertCell().append(bar(counts.completed + counts.failed, counts.total),
                            ` ${counts.completed} done, ${counts.failed} failed of ${counts.total}`);
    cell(row, ago(b.created_at));
  }
}

// -- start ---------------------------------------------------------------------------------
$("login-form").addEventListener("submit", e => { e.preventDefault(); signIn($("api-key").value.trim()); });
$("sign-out").addEventListener("click", () => { sessionStorage.removeItem(KEY_ITEM); state.key = null; showLogin(); });
$("upload-form").addEventListener("submit", upload);
signIn(sessionStorage.getItem(KEY_ITEM));
