// The cancelkit demo page: no framework, no build step.
"use strict";

// A random id; crypto.getRandomValues works on plain http too (randomUUID needs https).
function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// This tab's "user": the server keeps one latest-only slot per user, so two tabs never
// supersede each other. (A real app would use its login instead.)
const user = "tab-" + randomId().slice(0, 8);
const $ = (id) => document.getElementById(id);
let current = null; // the operation id of the newest search, while it runs
// The keystroke counter: requests travel on parallel connections and may reach the server
// (or different workers) out of order; X-Sequence tells the server which one is newest, so
// a late older search is refused (409, stale) instead of superseding the newer one.
let keystrokes = 0;

function setStatus(text) { $("status").textContent = text; }

function showMatches(matches) {
  $("results").replaceChildren(...matches.map((word) => {
    const li = document.createElement("li");
    li.textContent = word;
    return li;
  }));
}

// One keystroke, one request. Older requests are NOT aborted by the page: the server
// supersedes them (an aborted fetch would look like a closed tab instead).
async function search(query) {
  const op = randomId();
  const seq = ++keystrokes;
  current = op;
  $("stop").disabled = false;
  setStatus(`Searching for “${query}”…`);
  let response;
  try {
    response = await fetch("/search?" + new URLSearchParams({ q: query }), {
      headers: { "X-User": user, "X-Operation-Id": op, "X-Sequence": String(seq) },
    });
  } catch (error) {
    if (op === current) setStatus(`Network error: ${error}`);
    return;
  }
  const body = await response.json();
  if (op !== current) return; // a newer search owns the screen
  current = null;
  $("stop").disabled = true;
  if (response.ok) {
    setStatus(`${body.matches.length} matches for “${body.query}”.`);
    showMatches(body.matches);
  } else if (body.reason === "requested") {
    setStatus(`Stopped the search for “${query}”.`);
  } else {
    setStatus(`The search for “${query}” ended: ${body.reason || response.status}.`);
  }
}

// Stop: cancel the running search by its id, from another request.
async function stop() {
  if (current === null) return;
  const response = await fetch(`/operations/${current}`, {
    method: "DELETE",
    headers: { "X-User": user },
  });
  if (response.status === 404) setStatus("Nothing to stop: the search had already ended.");
}

$("q").addEventListener("input", (event) => {
  const query = event.target.value.trim();
  if (query) {
    search(query);
  } else {
    current = null;
    $("stop").disabled = true;
    setStatus("Type to search.");
    showMatches([]);
  }
});
$("search-form").addEventListener("submit", (event) => event.preventDefault());
$("stop").addEventListener("click", stop);

// The server's log, live (Server-Sent Events): this tab's searches, or every tab's.
const LABELS = {
  client_gone: "client gone",
  downstream_started: "downstream started",
  downstream_done: "downstream done",
  downstream_stopped: "downstream stopped",
};
const started = new Map(); // op id -> when it started, to show how long each search ran

function addLogRow(event) {
  const row = document.createElement("tr");
  row.className = event.kind;
  row.dataset.kind = event.kind;
  row.dataset.query = event.query;
  row.dataset.op = event.op;
  row.dataset.user = event.user;
  let detail = event.detail;
  if (event.kind === "started") {
    started.set(event.op, event.at);
  } else if (started.has(event.op)) {
    const ms = Math.round((event.at - started.get(event.op)) * 1000);
    detail = `${detail} (after ${ms} ms)`;
  }
  if (event.worker) detail = detail ? `${detail}, on worker ${event.worker}` : `on worker ${event.worker}`;
  const time = new Date(event.at * 1000).toLocaleTimeString([], { hour12: false });
  const tab = event.user === user ? "this tab" : event.user;
  const cells = [time, tab, LABELS[event.kind] || event.kind, event.query, event.op.slice(0, 8), detail];
  for (const [i, text] of cells.entries()) {
    const td = document.createElement("td");
    td.textContent = text;
    if (i === 1 || i === 4) td.className = "id";
    row.append(td);
  }
  $("log").tBodies[0].prepend(row); // newest first
}

let events = null;
function follow() {
  if (events !== null) events.close();
  $("log").tBodies[0].replaceChildren();
  $("stream").textContent = "(connecting…)";
  const params = $("all-tabs").checked ? {} : { user };
  events = new EventSource("/events?" + new URLSearchParams(params));
  events.onopen = () => { $("stream").textContent = "(live)"; };
  events.onerror = () => { $("stream").textContent = "(reconnecting…)"; };
  events.onmessage = (message) => {
    addLogRow(JSON.parse(message.data));
    refreshPanel();
  };
}
$("all-tabs").addEventListener("change", follow);
follow();

// The live panel: what cancelkit stopped today (the server's event seam), every 2 s and
// after each log event. On Redis it is the whole fleet's.
let panelPending = false;
async function refreshPanel() {
  if (panelPending) return;
  panelPending = true;
  try {
    const response = await fetch("/stats");
    if (!response.ok) return;
    const stats = await response.json();
    $("stat-superseded").textContent = stats.stopped.superseded;
    $("stat-requested").textContent = stats.stopped.requested;
    $("stat-client-gone").textContent = stats.stopped.client_disconnected;
    $("stat-other").textContent = stats.stopped.other;
    const median = stats.median_cancel_to_exit_ms;
    $("stat-latency").textContent = median === null ? "–" : `${median.toFixed(1)} ms`;
    $("stat-saved").textContent = `${stats.saved_seconds.toFixed(1)} s`;
  } catch (error) {
    // the server is restarting: the next refresh catches up
  } finally {
    panelPending = false;
  }
}
setInterval(refreshPanel, 2000);
refreshPanel();

// The background export: start it, follow its status until it ends, stop it by id.
let exportUrl = null; // the status URL of the running export (its Location)

function setExport(text, fraction) {
  $("export-status").textContent = text;
  if (fraction !== undefined) $("export-progress").value = fraction;
}

function describeExport(status) {
  const where = status.worker ? ` (worker ${status.worker})` : "";
  if (status.state === "running") {
    const p = status.progress;
    return p ? `Exporting: ${p.message}${where}…` : `Export started${where}…`;
  }
  if (status.state === "completed") return `Export finished: ${status.result.words} words${where}.`;
  if (status.state === "cancelled") return `Export stopped: ${status.reason.kind}${where}.`;
  if (status.state === "failed") return `Export failed: ${status.error.type}: ${status.error.message}.`;
  return `Export lost: ${status.error.message}.`;
}

async function followExport(url) {
  while (url === exportUrl) {
    // ?wait= returns at the end, or after a moment with the progress so far
    const response = await fetch(url + "?wait=0.3", { headers: { "X-User": user } });
    if (!response.ok) { setExport(`Export status: HTTP ${response.status}`); break; }
    const status = await response.json();
    const p = status.progress;
    setExport(describeExport(status), p && p.total ? p.done / p.total : undefined);
    if (status.state !== "running") break;
  }
  if (url === exportUrl) {
    exportUrl = null;
    $("export-stop").disabled = true;
    $("export-start").disabled = false;
  }
}

async function startExport() {
  $("export-start").disabled = true;
  const response = await fetch("/exports", { method: "POST", headers: { "X-User": user } });
  const body = await response.json();
  if (response.status !== 202) {
    setExport(`Export refused: ${body.detail}`);
    $("export-start").disabled = false;
    return;
  }
  exportUrl = response.headers.get("Location");
  $("export-stop").disabled = false;
  setExport("Export started…", 0);
  followExport(exportUrl);
}

async function stopExport() {
  if (exportUrl === null) return;
  const response = await fetch(exportUrl, { method: "DELETE", headers: { "X-User": user } });
  if (response.status === 404) setExport("Nothing to stop: the export had already ended.");
}

$("export-start").addEventListener("click", startExport);
$("export-stop").addEventListener("click", stopExport);
