// The dashboard. A file of its own: the page's Content-Security-Policy runs no inline script.
// It holds no API key: signing in (POST /session) leaves an HttpOnly session cookie, which every
// fetch and EventSource of this page sends by itself; changes also carry the session's CSRF token.
"use strict";

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c]));
const pretty = (v) => JSON.stringify(v ?? null, null, 1);
const ms = (v) => (v == null ? "" : v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(2)} s`);

// Event type -> the execution status it leaves (NOVA's words, as GET /executions and its filter use).
const EVENT_STATUS = {queued: "pending", started: "running", node_started: "running", node_finished: "running",
  retry: "retrying", succeeded: "completed", failed: "failed", dead: "dead", cancelled: "cancelled"};
const TERMINAL = new Set(["succeeded", "failed", "dead", "cancelled"]);
const OPEN = new Set(["pending", "running", "retrying"]);
const BUCKET_MS = 10_000, BUCKETS = 30;

let me = null;                 // the session: {admin, client, csrf_token}
let feed = null;               // EventSource of GET /events
const timers = [];
const rows = new Map();        // task_id -> row of the executions table
const workflows = new Map();   // workflow id -> name
const finished = new Map();    // task_id -> {t, duration} of runs that finished in the chart's window
let detail = null;             // the execution shown below, with its graph

class SignedOut extends Error {}

async function api(path, opts = {}) {
  const method = (opts.method || "GET").toUpperCase();
  const headers = {...(opts.headers || {})};
  if (!["GET", "HEAD"].includes(method) && me) headers["X-CSRF-Token"] = me.csrf_token;
  const r = await fetch(path, {...opts, method, headers, credentials: "same-origin"});
  if (r.status === 401 && path !== "/session") {
    showSignIn("Your session ended: sign in again.");
    throw new SignedOut("signed out");
  }
  if (!r.ok) {
    let message = `${path}: ${r.status}`;
    try { message = (await r.json()).error.message || message; } catch (e) { /* not our error shape */ }
    throw new Error(message);
  }
  return r.status === 204 ? null : r.json();
}

// ---- signing in and out ---------------------------------------------------------------------------

function showSignIn(message) {
  stopAll();
  me = null;
  $("app").hidden = true;
  $("logout-btn").hidden = true;
  $("who").textContent = "";
  $("conn").textContent = "signed out";
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("key").focus();
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  $("key").value = "";  // the key is not kept anywhere, not even in the form
  try {
    me = await api("/session", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({key})});
  } catch (e) {
    $("signin-error").textContent = "Sign-in refused: " + e.message;
    return;
  }
  start();
});

$("logout-btn").addEventListener("click", async () => {
  try { await api("/session", {method: "DELETE"}); } catch (e) { /* signed out either way */ }
  showSignIn("Signed out.");
});

function stopAll() {
  if (feed) feed.close();
  feed = null;
  closeDetail();
  while (timers.length) clearInterval(timers.pop());
}

function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("logout-btn").hidden = false;
  $("who").textContent = me.admin ? "signed in as operator" : `signed in as client ${me.client}`;
  for (const el of document.querySelectorAll(".admin-only")) el.hidden = !me.admin;
  connectFeed();
  loadWorkflows().then(loadRecent).catch(report);
  drawChart();
  timers.push(setInterval(drawChart, 1000));
  if (me.admin) {
    refreshQueue(); refreshDlq();
    timers.push(setInterval(refreshQueue, 2000), setInterval(refreshDlq, 10000));
  }
}

function report(e) {
  if (!(e instanceof SignedOut)) $("conn").textContent = "error: " + e.message;
}

// ---- operators' panels ----------------------------------------------------------------------------

function card(label, value) { return `<div class="card"><b>${esc(value)}</b><span>${esc(label)}</span></div>`; }

async function refreshQueue() {
  try {
    const q = await api("/inspect");
    const workers = q.groups.find((g) => g.stream === q.streams.requests.key && g.group.includes("worker")) || q.groups[0] || {};
    const proj = q.groups.find((g) => g.group.includes("projector")) || {};
    $("cards").innerHTML = card("queue depth (lag)", workers.lag ?? 0) + card("in flight (pending)", workers.pending ?? 0)
      + card("oldest pending", workers.oldest_pending_age_s == null ? "-" : workers.oldest_pending_age_s.toFixed(1) + " s")
      + card("projector lag", (proj.lag ?? 0) + (proj.pending ?? 0)) + card("delayed retries", q.delayed_retries)
      + card("dead letters", q.dead_letters) + card("requests stream", q.streams.requests.length);
  } catch (e) { report(e); }
}

async function refreshDlq() {
  try {
    const d = await api("/dlq?count=20");
    $("dlq").innerHTML = d.items.map((x) => `<tr><td>${esc(x.id)}</td><td>${esc(x.reason)}</td><td>${esc(x.error)}</td>
      <td><button type="button" data-replay="${esc(x.id)}">Replay</button>
      <button type="button" class="secondary" data-delete="${esc(x.id)}">Delete</button></td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">empty</td></tr>`;
  } catch (e) { report(e); }
}

$("dlq").addEventListener("click", async (ev) => {
  const replay = ev.target.dataset.replay, del = ev.target.dataset.delete;
  try {
    if (replay) await api(`/dlq/${encodeURIComponent(replay)}/replay`, {method: "POST"});
    if (del) await api(`/dlq/${encodeURIComponent(del)}`, {method: "DELETE"});
  } catch (e) { report(e); }
  refreshDlq();
});

// ---- executions: list, filters, live feed ---------------------------------------------------------

function filters() {
  return {client: me.admin ? $("f-client").value.trim() : "", workflow: $("f-workflow").value, status: $("f-status").value};
}

function matches(row, f) {
  return (!f.client || row.client === f.client) && (!f.workflow || String(row.workflow_id) === f.workflow)
    && (!f.status || row.status === f.status);
}

async function loadWorkflows() {
  const w = await api("/workflows?limit=1000");
  const items = w.workflows || [];
  for (const x of items) workflows.set(x.id, x.name);
  const options = items.map((x) => `<option value="${x.id}">${esc(x.name)} (#${x.id})</option>`).join("");
  $("wf-select").innerHTML = options;
  const chosen = $("f-workflow").value;
  $("f-workflow").innerHTML = `<option value="">all workflows</option>` + options;
  $("f-workflow").value = chosen;
}

async function loadRecent() {
  const f = filters();
  const q = new URLSearchParams({limit: "50"});
  if (f.client) q.set("client_slug", f.client);
  if (f.workflow) q.set("workflow_id", f.workflow);
  if (f.status) q.set("status", f.status);
  let r;
  try { r = await api(`/executions?${q}`); } catch (e) { report(e); return; }  // PostgreSQL may be down: live rows stay
  for (const [id, row] of rows) if (!row.live) rows.delete(id);
  const since = Date.now() - BUCKET_MS * BUCKETS;
  for (const x of r.executions || []) {
    const row = rows.get(x.task_id) || {};
    rows.set(x.task_id, {...row, task_id: x.task_id, execution_id: x.id, workflow_id: x.workflow_id,
      workflow: x.workflow_name, client: x.client_slug, status: row.live ? row.status : x.status,
      // A finished run's last node says nothing; a cancelled or failed one's says where it stopped.
      node: x.status === "completed" ? "" : x.current_node || "", duration_ms: x.duration_ms});
    const t = x.finished_at ? Date.parse(x.finished_at) : NaN;
    if (t >= since && x.duration_ms != null) finished.set(x.task_id, {t, duration: x.duration_ms});
  }
  renderRows();
}

for (const id of ["f-client", "f-workflow", "f-status"]) $(id).addEventListener("change", loadRecent);
$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadRecent(); });

function renderRows() {
  const f = filters();
  const shown = [...rows.values()].filter((r) => matches(r, f)).sort((a, b) => b.execution_id - a.execution_id).slice(0, 50);
  $("recent").innerHTML = shown.map((r) => `<tr class="click${detail && detail.taskId === r.task_id ? " selected" : ""}"
      data-task="${esc(r.task_id)}" data-execution="${esc(r.execution_id)}">
    <td>#${esc(r.execution_id)}</td><td>${esc(r.workflow || workflows.get(r.workflow_id) || r.workflow_id)}</td>
    <td>${esc(r.client)}</td><td class="st ${esc(r.status)}" data-status="${esc(r.status)}">${esc(r.status)}</td>
    <td>${esc(r.node)}</td><td>${esc(ms(r.duration_ms))}</td></tr>`).join("")
    || `<tr><td colspan="6" class="muted">no executions match</td></tr>`;
}

$("recent").addEventListener("click", (ev) => {
  const tr = ev.target.closest("tr[data-task]");
  if (tr) showExecution(Number(tr.dataset.execution), tr.dataset.task).catch(report);
});

function onFeedEvent(e) {
  const row = rows.get(e.task_id) || {task_id: e.task_id, execution_id: e.execution_id, workflow_id: e.workflow_id,
    workflow: e.data.workflow_name || workflows.get(e.workflow_id), client: e.client, node: ""};
  row.live = true;
  row.status = EVENT_STATUS[e.type] || row.status;
  if (e.type === "node_started") row.node = e.data.node_id;
  if (TERMINAL.has(e.type)) {
    row.node = e.type === "cancelled" ? (e.data.current_node || "") : "";
    if (e.data.duration_ms != null) row.duration_ms = e.data.duration_ms;
    if (e.type !== "cancelled" && e.data.duration_ms != null) finished.set(e.task_id, {t: Date.now(), duration: e.data.duration_ms});
  }
  rows.set(e.task_id, row);
  if (rows.size > 500) {
    const oldest = [...rows.values()].sort((a, b) => a.execution_id - b.execution_id)[0];
    rows.delete(oldest.task_id);
  }
  renderRows();
  if (e.type === "dead" && me.admin) refreshDlq();
}

function connectFeed() {
  feed = new EventSource("/events");
  for (const type of Object.keys(EVENT_STATUS)) feed.addEventListener(type, (m) => onFeedEvent(JSON.parse(m.data)));
  feed.onerror = () => { $("conn").textContent = "reconnecting…"; };
  feed.onopen = () => { $("conn").textContent = "live"; };
}

// ---- the chart: runs finished per 10 s (bars) and their mean duration (line) ----------------------

function drawChart() {
  const now = Date.now(), first = Math.floor(now / BUCKET_MS) - BUCKETS + 1;
  const counts = new Array(BUCKETS).fill(0), sums = new Array(BUCKETS).fill(0);
  for (const [id, p] of finished) {
    const i = Math.floor(p.t / BUCKET_MS) - first;
    if (i < 0) { finished.delete(id); continue; }
    if (i < BUCKETS) { counts[i]++; sums[i] += p.duration; }
  }
  const W = 600, H = 130, top = 14, bottom = 16, h = H - top - bottom, w = W / BUCKETS;
  const maxCount = Math.max(1, ...counts);
  const means = counts.map((c, i) => (c ? sums[i] / c : null));
  const maxMean = Math.max(1, ...means.filter((m) => m != null));
  let svg = `<line x1="0" y1="${H - bottom}" x2="${W}" y2="${H - bottom}" stroke="#2a323c"/>`;
  counts.forEach((c, i) => {
    const bh = (c / maxCount) * h;
    if (c) svg += `<rect x="${i * w + 1}" y="${H - bottom - bh}" width="${w - 2}" height="${bh}" fill="#58a6ff" fill-opacity="0.75"><title>${c} finished</title></rect>`;
  });
  const points = means.map((m, i) => (m == null ? null : `${i * w + w / 2},${H - bottom - (m / maxMean) * h}`)).filter(Boolean);
  if (points.length > 1) svg += `<polyline points="${points.join(" ")}" fill="none" stroke="#d29922" stroke-width="2"/>`;
  for (const p of points) { const [x, y] = p.split(","); svg += `<circle cx="${x}" cy="${y}" r="2.5" fill="#d29922"/>`; }
  const any = counts.some((c) => c > 0);
  svg += `<text x="2" y="11" fill="#8a97a4" font-size="10">${any ? `${maxCount} runs / 10 s` : "no run finished"}</text>`
    + (any ? `<text x="${W - 2}" y="11" fill="#d29922" font-size="10" text-anchor="end">${esc(ms(maxMean))}</text>` : "")
    + `<text x="2" y="${H - 3}" fill="#8a97a4" font-size="10">−5 min</text>`
    + `<text x="${W - 2}" y="${H - 3}" fill="#8a97a4" font-size="10" text-anchor="end">now</text>`;
  $("chart").innerHTML = svg;
  $("chart").dataset.finished = String(counts.reduce((a, b) => a + b, 0));
}

// ---- one execution: its workflow graph, lit as it runs --------------------------------------------

const COLORS = {
  idle: {background: "#1d2530", border: "#3a4550", font: "#d9e1e8"},
  running: {background: "#58a6ff", border: "#cfe5ff", font: "#0b0f14"},
  success: {background: "#1f3d2a", border: "#3fb950", font: "#d9e1e8"},
  failed: {background: "#4a1f22", border: "#f85149", font: "#ffd7d5"},
  cancelled: {background: "#2d2f33", border: "#8a97a4", font: "#d9e1e8"},
};
const SHAPES = {start: "ellipse", end: "ellipse", decision: "diamond", action: "box"};

function closeDetail() {
  if (!detail) return;
  if (detail.source) detail.source.close();
  if (detail.network) detail.network.destroy();
  detail = null;
}

async function showExecution(executionId, taskId) {
  closeDetail();
  const d = detail = {executionId, taskId, status: "pending", steps: [], error: null, selected: null};
  renderRows();
  $("detail-title").textContent = `#${executionId}`;
  $("cancel-msg").textContent = "";
  $("node-info").innerHTML = `<p class="muted">Click a node for its input, output, stdout and error.</p>`;
  const ex = await api(`/executions/${executionId}`);
  if (detail !== d) return;
  d.status = ex.status;
  d.error = ex.error_detail;
  for (const n of ex.chain || []) d.steps[n.step] = {...n};
  const version = ex.workflow_version ? `?version=${ex.workflow_version}` : "";
  d.graph = await api(`/workflows/${ex.workflow_id}/graph${version}`);
  if (detail !== d) return;
  drawGraph(d);
  paint(d);
  if (OPEN.has(d.status)) follow(d);
}

function follow(d) {
  // Replays the task's events, then follows it live until its end (the cookie authenticates it).
  d.source = new EventSource(`/tasks/${encodeURIComponent(d.taskId)}/events`);
  for (const type of Object.keys(EVENT_STATUS)) d.source.addEventListener(type, (m) => onTaskEvent(d, m.type, JSON.parse(m.data)));
}

function onTaskEvent(d, type, e) {
  if (detail !== d) return;
  const data = e.data || {};
  if (type === "node_started") d.steps[data.step] = {...data, status: "running"};
  else if (type === "node_finished") d.steps[data.step] = {...(d.steps[data.step] || {}), ...data};
  else {
    d.status = EVENT_STATUS[type] || d.status;
    const last = d.steps[d.steps.length - 1];
    // The node a retry or a cancel interrupted did not finish: it is not running any more either.
    if (last && last.status === "running" && (type === "retry" || type === "cancelled")) last.status = type === "cancelled" ? "cancelled" : "interrupted";
    if (data.error) d.error = data.error;
  }
  paint(d);
  if (TERMINAL.has(type)) {
    d.source.close();
    if (d.selected) showNode(d, d.selected);
  }
}

function levels(graph) {
  // Breadth-first from the start node: loops do not push nodes further right, the layout stays readable.
  const out = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const e of graph.edges) out.get(e.from)?.push(e.to);
  const level = new Map();
  const startNode = graph.nodes.find((n) => n.type === "start") || graph.nodes[0];
  const queue = [startNode.id];
  level.set(startNode.id, 0);
  while (queue.length) {
    const id = queue.shift();
    for (const to of out.get(id) || []) if (!level.has(to)) { level.set(to, level.get(id) + 1); queue.push(to); }
  }
  let deepest = Math.max(0, ...level.values());
  for (const n of graph.nodes) if (!level.has(n.id)) level.set(n.id, ++deepest);  // unreachable: drawn last
  return level;
}

function drawGraph(d) {
  const el = $("graph");
  el.innerHTML = "";
  el.dataset.nodes = "0";
  el.dataset.drawn = "0";
  if (typeof vis === "undefined") {
    el.innerHTML = `<p class="bad">The graph library did not load: ${esc($("lib-error").textContent)}</p>`;
    return;
  }
  const level = levels(d.graph);
  d.nodes = new vis.DataSet(d.graph.nodes.map((n) => ({id: n.id, level: level.get(n.id), shape: SHAPES[n.type] || "box",
    label: n.id, title: `${n.type}${n.label ? ": " + n.label : ""}`, margin: 8})));
  d.edges = new vis.DataSet(d.graph.edges.map((e, i) => ({id: i, from: e.from, to: e.to, label: e.label || undefined,
    // A loop's way back curves, so that it does not hide the way forward.
    smooth: level.get(e.to) <= level.get(e.from) ? {enabled: true, type: "curvedCW", roundness: 0.35} : {enabled: true, type: "cubicBezier", forceDirection: "horizontal", roundness: 0.4}})));
  d.network = new vis.Network(el, {nodes: d.nodes, edges: d.edges}, {
    layout: {hierarchical: {enabled: true, direction: "LR", levelSeparation: 160, nodeSpacing: 90, sortMethod: "directed"}},
    physics: false,
    interaction: {hover: true, dragView: true, zoomView: true},
    nodes: {font: {color: "#d9e1e8", face: "system-ui", size: 14, multi: false}, borderWidth: 2},
    edges: {arrows: "to", color: {color: "#3a4550", highlight: "#8a97a4"}, font: {color: "#d9e1e8", strokeWidth: 3, strokeColor: "#0b0f14", size: 12, align: "middle"}},
  });
  d.network.on("click", (p) => { if (p.nodes.length) showNode(d, p.nodes[0]); });
  // Fitted once drawn; data-drawn tells the browser tests the positions are final.
  d.network.once("afterDrawing", () => { d.network.fit(); el.dataset.drawn = "1"; });
  el.dataset.nodes = String(d.nodes.length);
  el.dataset.edges = String(d.edges.length);
  el.dataset.workflow = String(d.graph.workflow_id);
}

function nodeStates(d) {
  const states = new Map();
  for (const s of d.steps) {
    if (!s) continue;
    const st = states.get(s.node_id) || {visits: 0, total: 0, status: "idle"};
    st.visits++;
    st.total += s.duration_ms || 0;
    st.status = s.status === "success" ? "success" : s.status === "failed" ? "failed"
      : s.status === "running" ? "running" : s.status === "cancelled" ? "cancelled" : st.status;
    states.set(s.node_id, st);
  }
  return states;
}

function paint(d) {
  $("detail-status").textContent = d.status;
  $("detail-status").className = `st ${d.status}`;
  $("cancel-btn").hidden = !OPEN.has(d.status);
  const steps = d.steps.filter(Boolean);
  const last = steps[steps.length - 1];
  const running = OPEN.has(d.status) && last && last.status === "running" ? last.node_id : "";
  const states = nodeStates(d);
  const el = $("graph");
  el.dataset.running = running;
  el.dataset.status = d.status;
  el.dataset.path = steps.map((s) => s.node_id).join(",");
  $("path-text").textContent = steps.length ? "Path: " + steps.map((s) => s.node_id + (s.duration_ms != null ? ` (${ms(s.duration_ms)})` : s.status === "running" ? " (running)" : "")).join(" → ") : "";
  $("node-buttons").innerHTML = (d.graph ? d.graph.nodes : []).map((n) => {
    const st = states.get(n.id);
    return `<button type="button" class="node ${esc(n.id === running ? "running" : st ? st.status : "idle")}" data-node="${esc(n.id)}">${esc(n.id)}</button>`;
  }).join("");
  const err = d.error;
  $("detail-error").hidden = !err;
  $("detail-error").textContent = err ? `${err.node_id ? err.node_id + ": " : ""}${err.type || "error"}: ${err.message || ""}` : "";
  if (!d.nodes) return;
  d.nodes.update(d.graph.nodes.map((n) => {
    const st = states.get(n.id);
    const state = n.id === running ? "running" : st ? st.status : "idle";
    const c = COLORS[state] || COLORS.idle;
    const timing = st && st.total ? `\n${ms(st.total)}${st.visits > 1 ? ` · ${st.visits}×` : ""}` : "";
    return {id: n.id, label: n.id + timing, borderWidth: state === "running" ? 4 : 2,
      color: {background: c.background, border: c.border, highlight: {background: c.background, border: "#ffffff"}},
      font: {color: c.font}, shadow: state === "running" ? {enabled: true, color: "#58a6ff", size: 18, x: 0, y: 0} : false};
  }));
  // The path taken: each edge one step followed to the next.
  const taken = new Set();
  for (let i = 1; i < steps.length; i++) taken.add(`${steps[i - 1].node_id}>${steps[i].node_id}`);
  d.edges.update(d.graph.edges.map((e, i) => (taken.has(`${e.from}>${e.to}`)
    ? {id: i, width: 3, color: {color: "#3fb950"}} : {id: i, width: 1, color: {color: "#3a4550"}})));
}

$("node-buttons").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-node]");
  if (b && detail) showNode(detail, b.dataset.node);
});

async function showNode(d, nodeId) {
  d.selected = nodeId;
  let runs;
  try {
    // What the API shows of a run, credentials masked as everywhere.
    const ex = await api(`/executions/${d.executionId}`);
    runs = (ex.chain || []).filter((n) => n.node_id === nodeId);
  } catch (e) {
    if (e instanceof SignedOut) return;
    runs = d.steps.filter((s) => s && s.node_id === nodeId);
  }
  if (detail !== d) return;
  const block = (title, v) => (v == null || v === "" ? "" : `<h4>${esc(title)}</h4><pre>${esc(typeof v === "string" ? v : pretty(v))}</pre>`);
  $("node-info").innerHTML = `<h3 id="node-info-title">${esc(nodeId)}</h3>`
    + (runs.length ? runs.map((r) => `<p class="muted">step ${esc(r.step)} · <span class="${esc(r.status)}">${esc(r.status)}</span>${r.attempt ? " · attempt " + esc(r.attempt) + "/" + esc(r.max_attempts) : ""}
        ${r.duration_ms != null ? " · " + esc(ms(r.duration_ms)) : ""}${r.next_node ? " · next " + esc(r.next_node) : ""}</p>`
        + block("input", r.input_context) + block("output", r.output_context) + block("stdout", r.stdout)
        + block("stderr", r.stderr) + block("error", r.error)).join("")
      : `<p class="muted">not run (yet) in this execution</p>`);
}

$("cancel-btn").addEventListener("click", async () => {
  const d = detail;
  if (!d) return;
  $("cancel-btn").disabled = true;
  try {
    const r = await api(`/executions/${d.executionId}/cancel`, {method: "POST"});
    $("cancel-msg").textContent = r.message;
    if (r.cancelled || r.status === "REVOKED") { d.status = "cancelled"; paint(d); }
  } catch (e) {
    $("cancel-msg").textContent = "Cancel refused: " + e.message;
  } finally {
    $("cancel-btn").disabled = false;
  }
});

// ---- executing ------------------------------------------------------------------------------------

$("run-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("run-error").textContent = "";
  let ctx;
  try { ctx = JSON.parse($("ctx").value || "{}"); } catch (e) { $("run-error").textContent = "initial context is not JSON: " + e.message; return; }
  try {
    const body = {initial_context: ctx};
    if (me.admin && $("client").value.trim()) body.client_slug = $("client").value.trim();
    const r = await api(`/workflows/${$("wf-select").value}/execute`, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!rows.has(r.task_id)) rows.set(r.task_id, {task_id: r.task_id, execution_id: r.execution_id, workflow_id: r.workflow_id,
      workflow: r.workflow_name, client: me.client || body.client_slug || "_default", status: "pending", node: "", live: true});
    renderRows();
    await showExecution(r.execution_id, r.task_id);
  } catch (e) {
    if (!(e instanceof SignedOut)) $("run-error").textContent = e.message;
  }
});

// ---- start ----------------------------------------------------------------------------------------

async function libraryCheck() {
  if (typeof vis !== "undefined") return;
  const src = document.querySelector("script[src*='vis-network']").getAttribute("src");
  let message = "the graph library did not load";
  try { message = (await (await fetch(src)).json()).error.message; } catch (e) { /* not our error shape */ }
  $("lib-error").textContent = message;
  $("lib-error").hidden = false;
}

// Read by the browser tests: where a node of the graph is drawn, in page coordinates.
window.novaDashboard = {
  nodePosition(id) {
    if (!detail || !detail.network) return null;
    const p = detail.network.canvasToDOM(detail.network.getPositions([id])[id]);
    const box = $("graph").getBoundingClientRect();
    return {x: box.left + p.x, y: box.top + p.y};
  },
};

(async () => {
  await libraryCheck();
  try {
    me = await api("/session");
    start();
  } catch (e) {
    showSignIn("");
  }
})();
