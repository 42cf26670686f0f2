// rtunnel admin pages: one EventSource (/events) feeds both the dashboard and the inspector. Captured data
// is only ever put into the page as text (textContent), never as markup.
"use strict";

const state = { snapshot: null, rows: [], series: new Map(), errors: [], refusals: [], selected: null };
const MAX_EVENTS = 50;
const $ = (id) => document.getElementById(id);
const page = location.pathname === "/inspector" ? "inspector" : "dashboard";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d${String(h).padStart(2, "0")}h`;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m${String(s % 60).padStart(2, "0")}s`;
  return `${s % 60}s`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n, unit = -1;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function isError(status) { return status === null || status >= 500; }

function statusCell(status) {
  const td = el("td", status === null ? "no response" : status, "num");
  if (isError(status)) td.classList.add("status-error");
  return td;
}

function fill(tbody, rows, build) {
  tbody.replaceChildren(...rows.map(build));
}

// -- dashboard --------------------------------------------------------------------------------------------

function renderLinks() {
  const status = state.snapshot.status;
  const links = status.agents || status.relays || [];
  $("links-title").textContent = `${state.snapshot.role === "relay" ? "Agents" : "Relays"} connected: ${links.length}`;
  $("links-peer").textContent = state.snapshot.role === "relay" ? "Agent address" : "Relay";
  fill($("links").tBodies[0], links, (link) => {
    const tr = el("tr");
    tr.append(el("td", link.peer, "mono"), el("td", link.tunnel || "–"), el("td", duration(link.uptime_s), "num"),
      el("td", link.rtt_ms === null ? "–" : `${link.rtt_ms.toFixed(1)} ms`, "num"), el("td", link.in_flight, "num"));
    return tr;
  });
  $("links").hidden = links.length === 0;
  $("links-empty").hidden = links.length !== 0;
  const ready = status.ready ? "ready" : "NOT ready";
  $("summary").textContent = `${state.snapshot.role} · rtunnel ${status.version} · up ${duration(status.uptime_s)} · ${ready}`;
}

function chart(id, points, index, step, format) {
  const figure = $(id);
  const svg = figure.querySelector("svg");
  const values = points.map((p) => p[index] / step);
  const peak = Math.max(...values, 0);
  const top = peak > 0 ? peak * 1.1 : 1;
  const width = 240, height = 60, n = Math.max(values.length - 1, 1);
  const coords = values.map((v, i) => `${(i / n * width).toFixed(1)},${(height - v / top * (height - 2)).toFixed(1)}`);
  const ns = "http://www.w3.org/2000/svg";
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `0,${height} ${coords.join(" ")} ${width},${height}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", "line");
  line.setAttribute("points", coords.join(" "));
  const axis = document.createElementNS(ns, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(width));
  axis.setAttribute("y1", String(height)); axis.setAttribute("y2", String(height));
  svg.replaceChildren(area, axis, line);
  // The last complete bucket is "now": the newest one is still filling.
  const now = values.length > 1 ? values[values.length - 2] : 0;
  const text = `now ${format(now)}/s · peak ${format(peak)}/s`;
  figure.querySelector(".value").textContent = text;
  svg.setAttribute("aria-label", `${figure.querySelector("figcaption").firstChild.textContent.trim()}: ${text}`);
}

function renderCharts() {
  const step = state.snapshot.series.step;
  const points = [...state.series.values()].sort((a, b) => a[0] - b[0]).slice(-120);
  const rate = (v) => (v >= 10 ? v.toFixed(0) : v.toFixed(1));
  chart("chart-requests", points, 1, step, rate);
  chart("chart-errors", points, 2, step, rate);
  chart("chart-bytes", points, 3, step, (v) => bytes(Math.round(v)));
}

function eventRow(e) {
  const tr = el("tr");
  tr.append(el("td", clock(e.time)), statusCell(e.status), el("td", `${e.method} ${e.path}`, "mono"),
    el("td", e.reason || "–"), el("td", e.request_id || "–", "mono"));
  return tr;
}

function renderEvents() {
  for (const [name, list] of [["errors", state.errors], ["refusals", state.refusals]]) {
    fill($(name).tBodies[0], [...list].reverse(), eventRow);
    $(name).hidden = list.length === 0;
    $(`${name}-empty`).hidden = list.length !== 0;
  }
}

function renderInfo() {
  const info = state.snapshot.info || {};
  if (state.snapshot.role !== "agent") return;
  $("allowlist-section").hidden = false;
  $("refusals-section").hidden = false;
  const rules = info.allowlist || [];
  const items = rules.length ? rules.map((r) => el("li", r, "mono")) :
    [el("li", `no --allow rule: every request is forwarded to ${info.upstream} (unrestricted)`)];
  $("allowlist").replaceChildren(...items);
}

// -- inspector --------------------------------------------------------------------------------------------

function matches(row) {
  const cls = $("filter-status").value;
  if (cls === "none" && row.status !== null) return false;
  if (cls && cls !== "none" && (row.status === null || String(row.status)[0] !== cls)) return false;
  const text = $("filter-path").value.trim();
  return !text || row.path.includes(text);
}

function exchangeRow(row) {
  const tr = el("tr");
  tr.tabIndex = 0;
  tr.dataset.id = row.id;
  tr.setAttribute("aria-selected", String(row.id === state.selected));
  const path = el("td", row.path, "mono");
  if (row.replay_of) path.append(el("span", `replay of #${row.replay_of}`, "replay-mark"));
  tr.append(el("td", row.id, "num"), el("td", clock(row.time)), el("td", row.method), path, statusCell(row.status),
    el("td", `${row.duration_ms.toFixed(1)} ms`, "num"), el("td", bytes(row.size), "num"),
    el("td", row.request_id || "–", "mono col-wide"), el("td", row.peer, "mono col-wide"));
  return tr;
}

function renderRows() {
  const shown = state.rows.filter(matches).reverse();
  fill($("exchanges").tBodies[0], shown, exchangeRow);
  const keeps = state.snapshot.inspector.limit;
  $("count").textContent = `${shown.length} shown of ${state.rows.length} (keeps the last ${keeps})`;
}

function headersTable(id, headers) {
  fill($(id).tBodies[0], headers, ([name, value]) => {
    const tr = el("tr");
    tr.append(el("td", name), el("td", value));
    return tr;
  });
}

function showBody(prefix, body) {
  const kinds = { json: "JSON, pretty-printed", text: "text", binary: "binary: hex preview", empty: "no body" };
  let note = `${kinds[body.kind]} · ${bytes(body.size)}`;
  if (body.dropped) note += " · not captured (the inspector's buffer was full)";
  else if (body.truncated) note += ` · first ${bytes(body.captured)} captured`;
  if (body.content_type) note += ` · ${body.content_type}`;
  $(`${prefix}-kind`).textContent = note;
  $(`${prefix}-body`).textContent = body.text;
}

async function openDetail(id) {
  state.selected = id;
  renderRows();
  const response = await fetch(`/api/exchanges/${id}`, { credentials: "same-origin" });
  const detail = $("detail");
  detail.hidden = false;
  $("replay-result").textContent = "";
  if (!response.ok) {
    $("detail-title").textContent = `#${id}: ${(await response.text()).trim()}`;
    return;
  }
  const x = await response.json();
  const status = x.status === null ? "no response" : `${x.status} ${x.response.reason}`;
  $("detail-title").textContent = `#${x.id} ${x.method} ${x.path} → ${status}`;
  const replayOf = x.replay_of ? ` · replay of #${x.replay_of}` : "";
  $("detail-meta").textContent = `${clock(x.time)} · ${x.duration_ms.toFixed(1)} ms · request id ${x.request_id || "–"} · ` +
    `${x.peer || "no agent"}${x.client ? ` · client ${x.client}` : ""}${x.note ? ` · ${x.note}` : ""}${replayOf}`;
  headersTable("request-headers", [...x.request.headers, ...x.request.trailers]);
  headersTable("response-headers", [...x.response.headers, ...x.response.trailers]);
  showBody("request", x.request.body);
  showBody("response", x.response.body);
  const replay = $("replay");
  replay.hidden = !state.snapshot.inspector.replay;
  replay.disabled = !x.replayable;
  replay.title = x.replayable ? "" : "its request body was not captured whole";
  replay.onclick = () => doReplay(x);
}

async function doReplay(x, confirmed = false) {
  const idempotent = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"].includes(x.method);
  if (!idempotent && !confirmed) {
    if (!window.confirm(`${x.method} is not idempotent: replaying it may repeat its effect. Replay #${x.id}?`)) return;
    confirmed = true;
  }
  const url = `/api/exchanges/${x.id}/replay${confirmed ? "?confirm=1" : ""}`;
  const response = await fetch(url, { method: "POST", credentials: "same-origin",
    headers: { "X-CSRF-Token": state.snapshot.csrf || "" } });
  const text = await response.text();
  if (response.status === 202) {
    $("replay-result").textContent = `sent again as request ${JSON.parse(text).request_id}`;
  } else {
    let reason = text.trim();
    try { reason = JSON.parse(text).error; } catch (_) { /* plain text */ }
    $("replay-result").textContent = `replay refused: ${reason}`;
  }
}

// -- the event stream -------------------------------------------------------------------------------------

function mergeSeries(series) {
  for (const point of series.points) state.series.set(point[0], point);
  for (const key of state.series.keys()) if (key <= series.last - 120) state.series.delete(key);
}

function addEvents(list, more) {
  list.push(...more);
  list.splice(0, Math.max(0, list.length - MAX_EVENTS));
}

function render() {
  if (page === "dashboard") {
    renderLinks(); renderCharts(); renderEvents(); renderInfo();
  } else if (state.snapshot.inspector.enabled) {
    renderRows();
  }
}

function start() {
  $(page).hidden = false;
  $(`nav-${page}`).setAttribute("aria-current", "page");
  const source = new EventSource("/events");
  source.addEventListener("snapshot", (event) => {
    const data = JSON.parse(event.data);
    state.snapshot = data;
    state.series.clear();
    mergeSeries(data.series);
    state.errors = data.errors; state.refusals = data.refusals;
    state.rows = data.inspector.rows;
    document.title = `rtunnel ${data.role} admin`;
    $("title").textContent = `rtunnel ${data.role}`;
    $("exchanges-peer").textContent = data.role === "relay" ? "Agent" : "Relay";
    $("inspector-off").hidden = data.inspector.enabled;
    $("filters").hidden = !data.inspector.enabled;
    $("exchanges").hidden = !data.inspector.enabled;
    $("logout").hidden = !data.logout;
    $("live").textContent = "live";
    $("live").classList.remove("down");
    render();
  });
  source.addEventListener("update", (event) => {
    const data = JSON.parse(event.data);
    state.snapshot.status = data.status;
    mergeSeries(data.series);
    addEvents(state.errors, data.errors);
    addEvents(state.refusals, data.refusals);
    state.rows.push(...data.rows);
    state.rows.splice(0, Math.max(0, state.rows.length - state.snapshot.inspector.limit));
    $("live").textContent = `live · updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
    render();
  });
  source.onerror = () => {
    $("live").textContent = "disconnected: reconnecting…";
    $("live").classList.add("down");
  };
  $("filter-status").addEventListener("change", renderRows);
  $("filter-path").addEventListener("input", renderRows);
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  const pick = (event) => {
    const tr = event.target.closest("tr[data-id]");
    if (tr && (event.type === "click" || event.key === "Enter")) openDetail(Number(tr.dataset.id));
  };
  $("exchanges").addEventListener("click", pick);
  $("exchanges").addEventListener("keydown", pick);
  $("logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin",
      headers: { "X-CSRF-Token": state.snapshot.csrf || "" } });
    location.href = "/login";
  });
}

document.addEventListener("DOMContentLoaded", start);
