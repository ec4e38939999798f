// celery-ledger web console: the live parts of the pages. Served from the package
// (no CDN, no build step); every value goes into the page as text, never as HTML.
"use strict";

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) { td.className = cls; }
  td.textContent = text == null ? "" : String(text);
  row.appendChild(td);
  return td;
}

function taskLink(td, taskId, shownId) {
  td.textContent = "";
  const a = document.createElement("a");
  a.href = "/tasks/" + encodeURIComponent(taskId);
  a.textContent = shownId == null ? taskId : shownId;
  td.appendChild(a);
}

function stateBadge(td, state) {
  td.textContent = "";
  if (!state) { return; }
  const span = document.createElement("span");
  span.className = "state s-" + state.toLowerCase().replace(/[^a-z0-9_-]/g, "");
  span.textContent = state;
  td.appendChild(span);
}

// One EventSource per page; onEvent(event) for each appended event.
function follow(query, onEvent, status) {
  const source = new EventSource("/api/events" + query);
  source.onopen = () => { if (status) { status.textContent = "live"; status.classList.add("on"); } };
  source.onerror = () => { if (status) { status.textContent = "reconnecting…"; status.classList.remove("on"); } };
  source.onmessage = (m) => onEvent(JSON.parse(m.data));
  // Too slow to keep up: the server ended the stream; start again from now.
  source.addEventListener("overflow", () => { source.close(); follow("", onEvent, status); });
  return source;
}

function livePage() {
  const body = document.getElementById("live-events");
  const status = document.getElementById("live-status");
  const seen = new Set();
  follow("?backlog=50", (e) => {
    if (seen.has(e.position)) { return; }
    seen.add(e.position);
    const tr = document.createElement("tr");
    tr.className = "fresh";
    tr.dataset.position = e.position;
    cell(tr, e.position);
    const when = cell(tr, e.time.replace("T", " ").slice(0, 23), "time");
    when.title = e.time;
    // Text as the server escaped it for display (e.shown); the link keeps the stored id.
    const shown = e.shown || e;
    cell(tr, shown.type);
    stateBadge(cell(tr, ""), shown.state);
    const task = cell(tr, shown.task_id || shown.stream_id);
    if (e.task_id) { taskLink(task, e.task_id, shown.task_id); }
    cell(tr, shown.name);
    cell(tr, shown.worker);
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > 500) { body.deleteRow(-1); }
  }, status);
}

function tasksPage() {
  const body = document.getElementById("task-rows");
  const status = document.getElementById("live-status");
  if (!body) { return; }
  let pending = null;
  const refresh = () => {
    pending = null;
    fetch("/partials/tasks" + window.location.search, { headers: { Accept: "text/html" } })
      .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.status))))
      .then((html) => {
        // Server-rendered and escaped by the template; this only swaps the rows.
        const tmp = document.createElement("tbody");
        tmp.innerHTML = html;
        body.replaceChildren(...tmp.children);
      })
      .catch(() => { if (status) { status.textContent = "refresh failed"; } });
  };
  // Only the first page follows the log: later pages would shift under the reader.
  if (body.dataset.live !== "1") { return; }
  follow("", (e) => {
    if (!e.task_id) { return; }
    if (pending === null) { pending = setTimeout(refresh, 300); }
  }, status);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "live") { livePage(); }
  if (page === "tasks") { tasksPage(); }
});
