// m2mhub operator console: a single-page app over /api/v1, no framework.
//
// Model: the URL fragment names the page (#/devices/abc); `render()` runs the
// page function, which builds DOM nodes with `h()` (text always goes in as
// text nodes: no data ever passes through innerHTML). Each page may start
// timers with `every()` and live streams with `live()`, and register
// cleanups with `onLeave()`; all stop when the page changes. Async work
// checks `current(gen)` so a slow answer never draws over a newer page.
//
// A plain ES module: charts (uPlot) and the map (Leaflet) live in their
// own modules; the vendored libraries are classic scripts loaded before
// this one (index.html), as globals.

import { timeChart, barChart, align } from "./charts.js";
import { createMap, fleetLayer, fenceLayer, fenceDrawer, trackLayer } from "./map.js";

const TOKEN_KEY = "m2mhub.token";
const THEME_KEY = "m2mhub.theme";
const state = { me: null, gen: 0, timers: [], streams: [], leave: [], config: null };

// ---- DOM -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

const $ = (id) => document.getElementById(id);

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "Nothing here.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((t) => (t instanceof Node ? t : h("th", {}, t))))),
    h("tbody", {}, rows));
}

// Times are shown in the operator's zone (the browser's), named in the bar.
function fmtTime(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toLocaleString();
}

function fmtDuration(secs) {
  if (secs === null || secs === undefined) return "—";
  if (secs < 120) return secs + " s";
  if (secs < 7200) return Math.round(secs / 60) + " min";
  if (secs < 172800) return Math.round(secs / 3600) + " h";
  return Math.round(secs / 86400) + " d";
}

function fmtRate(r) {
  if (!Number.isFinite(r)) return "—";
  if (r === 0) return "0";
  return r >= 100 ? r.toFixed(0) : r >= 1 ? r.toFixed(1) : r.toFixed(2);
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function fmtValue(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(6).replace(/\.?0+$/, "");
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

function json(v) {
  return v === null || v === undefined ? "" : JSON.stringify(v);
}

// ---- API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || "HTTP " + status);
    this.status = status;
    this.problem = problem || {};
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch("/api/v1" + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401 && path !== "/auth/login") {
    logout("Your session has ended; please log in again.");
    throw new ApiError(401, { detail: "not logged in" });
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { detail: text }; }
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

const get = (path) => api("GET", path);

// `fn` over `items` with at most `limit` calls in flight: the API bounds
// requests in flight per token (`http.max_requests_per_token`), and a page
// that fans out should leave room for the others.
async function mapLimit(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const t = q.toString();
  return t ? "?" + t : "";
}

const enc = encodeURIComponent;

function canWrite() {
  return state.me && (state.me.role === "operator" || state.me.role === "admin");
}

function isAdmin() {
  return state.me && state.me.role === "admin";
}

// Show an error at the top of the page (problem documents: their `detail`).
function showError(e) {
  if (e instanceof ApiError && e.status === 401) return;
  const b = $("banner");
  replace(b, String(e.message || e), " ", h("button", { type: "button", onclick: () => { b.hidden = true; } }, "×"));
  b.hidden = false;
}

function clearError() {
  $("banner").hidden = true;
}

// Run an action from a button; errors go to the banner.
function act(fn) {
  return async (ev) => {
    const btn = ev && ev.currentTarget;
    if (btn) btn.disabled = true;
    try { clearError(); await fn(ev); } catch (e) { showError(e); } finally { if (btn) btn.disabled = false; }
  };
}

// A write button: absent for viewers (the API refuses them anyway).
function writeButton(label, fn, cls) {
  return canWrite() ? h("button", { type: "button", class: cls, onclick: act(fn) }, label) : null;
}


// Stop what the current page started: timers, live streams, cleanups
// (charts and maps release their observers and listeners).
function stopPage() {
  state.gen += 1;
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.streams.forEach((c) => c.abort());
  state.streams = [];
  for (const f of state.leave.splice(0)) { try { f(); } catch (e) { console.warn("cleanup", e); } }
}

function onLeave(f) {
  state.leave.push(f);
}

// The console's settings from the server (the map's tile server), once.
async function consoleConfig() {
  if (!state.config) state.config = await get("/console/config");
  return state.config;
}

// ---- Theme -----------------------------------------------------------------------
//
// auto (the system's preference) → dark → light, remembered in local
// storage. `data-theme` on the root is always the one in effect (light or
// dark), so the stylesheet has one dark palette. Pages with charts redraw,
// since uPlot paints with the colours of the moment.

const THEMES = ["auto", "dark", "light"];
const systemDark = matchMedia("(prefers-color-scheme: dark)");

function applyTheme(choice) {
  const dark = choice === "dark" || (choice === "auto" && systemDark.matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  document.documentElement.dataset.themeChoice = choice;
  const b = $("theme");
  if (b) replace(b, "Theme: " + choice);
}

function cycleTheme() {
  const cur = localStorage.getItem(THEME_KEY) || "auto";
  const next = THEMES[(THEMES.indexOf(cur) + 1) % THEMES.length];
  localStorage.setItem(THEME_KEY, next);
  applyTheme(next);
  render();
}

// ---- Live updates ------------------------------------------------------------
//
// `/api/v1/live` is a server-sent-events stream. It is read with fetch (not
// EventSource) so the token travels in the Authorization header, never in a
// URL. The server ends a stream after a few minutes (so a revoked token stops
// receiving); we reconnect with backoff while the page lasts. `badge` shows
// the state: live, or reconnecting.

function live(path, handlers, badge) {
  const gen = state.gen;
  const ctl = new AbortController();
  state.streams.push(ctl);
  const show = (text, cls) => { if (badge) { badge.className = "livebadge " + cls; replace(badge, text); } };
  const dispatch = (block) => {
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trimStart();
    }
    if (!data || !current(gen) || !handlers[name]) return;
    try { handlers[name](JSON.parse(data)); } catch (e) { console.error("live " + name, e); }
  };
  (async () => {
    let backoff = 1000;
    while (current(gen)) {
      try {
        const resp = await fetch("/api/v1/live" + path, {
          headers: { Accept: "text/event-stream", Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
          signal: ctl.signal,
        });
        if (resp.status === 401) { logout("Your session has ended; please log in again."); return; }
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        show("live", "on");
        backoff = 1000;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n/g, "\n");
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            dispatch(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      if (!current(gen)) return;
      show("reconnecting…", "off");
      if (handlers.lagged) handlers.lagged({});
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 30000);
    }
  })();
}

function liveBadge() {
  return h("span", { class: "livebadge off" }, "connecting…");
}

// ---- Routing -----------------------------------------------------------------

function every(ms, fn) {
  const gen = state.gen;
  const tick = async () => {
    if (!current(gen)) return;
    try { await fn(); } catch (e) { showError(e); }
  };
  state.timers.push(setInterval(tick, ms));
  return tick();
}

function current(gen) {
  return gen === state.gen;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, qs] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(qs || "") };
}

function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

const NAV = [
  ["#/", "Overview", () => true],
  ["#/devices", "Devices", () => true],
  ["#/map", "Map", () => true],
  ["#/alarms", "Alarms", () => true],
  ["#/rules", "Rules", () => true],
  ["#/dashboards", "Dashboards", () => true],
  ["#/settings", "Fleet settings", () => true],
  ["#/reports", "Reports", () => true],
  ["#/ota", "Firmware", () => true],
  ["#/audit", "Audit", isAdmin],
  ["#/security", "Security events", () => true],
  ["#/cluster", "Cluster", () => true],
];

async function render() {
  stopPage();
  clearError();
  const { parts, params } = parseHash();
  // A shared dashboard opens without login: its token is in the link.
  if (parts[0] === "shared" && parts[1]) return sharedDashboard(parts[1]);
  if (!sessionStorage.getItem(TOKEN_KEY)) return renderLogin();
  if (!state.me) {
    try { state.me = await get("/auth/me"); } catch (e) { if (!(e instanceof ApiError && e.status === 401)) showError(e); return; }
  }
  renderBar(parts[0] || "");
  const view = $("view");
  replace(view);
  const gen = state.gen;
  const page = {
    "": overview, devices: parts[1] ? device : devices, map: map, alarms: alarms,
    rules: parts[1] ? ruleForm : rules, audit: audit, security: security,
    dashboards: parts[1] ? dashboard : dashboards,
    ota: parts[1] ? campaign : firmware, settings: fleetSettings, cluster: cluster,
    reports: parts[1] ? reportPage : reports,
  }[parts[0] || ""];
  try {
    if (page) await page(view, gen, parts, params);
    else replace(view, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
  } catch (e) {
    if (current(gen)) showError(e);
  }
}

function renderBar(section) {
  $("bar").hidden = false;
  replace($("zone"), Intl.DateTimeFormat().resolvedOptions().timeZone || "");
  replace($("nav"), NAV.filter(([, , show]) => show()).map(([href, label]) =>
    h("a", { href, class: href === "#/" + section ? "active" : null }, label)));
  replace($("who"), state.me.username, " · ", state.me.role, state.me.tenant ? " · " + state.me.tenant : "");
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.me = null;
  renderLogin(message);
}

// ---- Login -------------------------------------------------------------------

function renderLogin(message) {
  stopPage();
  $("bar").hidden = true;
  const err = h("p", { class: "error" }, message || "");
  const user = h("input", { name: "username", autocomplete: "username", required: true, autofocus: true });
  const pass = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const form = h("form", { class: "stack card login" },
    h("h1", {}, "m2mhub console"),
    h("label", {}, "User name", user),
    h("label", {}, "Password", pass),
    h("button", { class: "primary", type: "submit" }, "Log in"),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    replace(err);
    try {
      const r = await api("POST", "/auth/login", { username: user.value, password: pass.value });
      sessionStorage.setItem(TOKEN_KEY, r.token);
      state.me = { username: r.username, role: r.role, tenant: r.tenant };
      if (!location.hash || location.hash === "#/login") location.hash = "#/";
      else render();
    } catch (e) {
      replace(err, e.message);
    }
  });
  replace($("view"), form);
  user.focus();
}

// ---- Overview ----------------------------------------------------------------

const SEVERITIES = ["critical", "major", "minor", "warning", "info"];

async function overview(view, gen) {
  const figures = {};
  const card = (key, label) => {
    figures[key] = h("div", { class: "figure" }, "…");
    return h("div", { class: "card" }, h("div", { class: "muted" }, label), figures[key]);
  };
  const alarmsBox = h("div", { class: "cards" });
  const badge = liveBadge();
  const trafficBox = h("div", { class: "chart-box", "data-chart": "traffic" });
  const connBox = h("div", { class: "chart-box", "data-chart": "connections" });
  const alarmChartBox = h("div", { class: "chart-box", "data-chart": "alarms" });
  const talkersBox = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const silentBox = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const healthBox = h("div", { class: "cards", "data-health": "" }, h("p", { class: "muted" }, "Loading…"));
  // The time-series store's state and the rules' health: what an operator
  // must notice before readings or alarms go missing.
  const drawHealth = async () => {
    const [st, rs] = await Promise.all([get("/telemetry/stats"), get("/rules")]);
    if (!current(gen)) return;
    const items = rs.items || [];
    const failing = items.filter((r) => r.counters && (r.counters.failed > 0 || r.counters.action_failures > 0));
    const card = (key, label, value, bad) => h("div", { class: "card" + (bad ? " bad" : ""), "data-health": key },
      h("div", { class: "muted" }, label), h("div", { class: "figure" }, String(value)));
    replace(healthBox,
      card("disk", "Stored on disk", fmtBytes(st.disk_bytes || 0)),
      card("series", "Series", st.series ?? 0),
      card("write-errors", "Store write errors", st.write_errors ?? 0, st.write_errors > 0),
      card("disk-full", "Disk full", st.disk_full ? "yes" : "no", !!st.disk_full),
      card("rules", "Rules enabled", items.filter((r) => r.enabled).length + " of " + items.length),
      card("rules-failing", "Rules failing", failing.length, failing.length > 0));
  };
  replace(view,
    h("h1", {}, "Fleet overview ", badge),
    h("div", { class: "cards" },
      card("total", "Devices"), card("online", "Online"), card("offline", "Offline"), card("rate", "Messages / s")),
    h("h2", {}, "Active alarms"), alarmsBox,
    h("div", { class: "overview-charts" },
      h("section", {}, h("h2", {}, "Messages per second, last hour"), trafficBox),
      h("section", {}, h("h2", {}, "Connections, last hour"), connBox),
      h("section", {}, h("h2", {}, "Alarms raised per hour, last 24 h"), alarmChartBox),
      h("section", {}, h("h2", {}, "Top talkers, last hour"), talkersBox)),
    h("h2", {}, "Gone silent"), silentBox,
    h("h2", {}, "Storage and rules"), healthBox);
  let last = null;
  const sample = async () => {
    const [devs, broker, summary] = await Promise.all([
      get("/devices?limit=1"), get("/broker"), get("/alarms/summary"),
    ]);
    if (!current(gen)) return;
    // Online from the broker's live connections: counting `online` per
    // device would need a scan of the whole fleet.
    const online = broker.connections;
    replace(figures.total, devs.total);
    replace(figures.online, online);
    replace(figures.offline, Math.max(0, devs.total - online));
    const now = { t: performance.now(), n: broker.counters.messages_received };
    if (last && now.t > last.t) replace(figures.rate, ((now.n - last.n) * 1000 / (now.t - last.t)).toFixed(1));
    last = now;
    replace(alarmsBox, SEVERITIES.map((sev) =>
      h("a", { class: "card", href: "#/alarms?severity=" + sev },
        h("span", { class: "badge sev-" + sev }, sev), h("div", { class: "figure" }, summary[sev] || 0))),
    h("div", { class: "card" }, h("div", { class: "muted" }, "Not acknowledged"), h("div", { class: "figure" }, summary.unacked || 0)));
  };

  // Rates over the last hour: the API's one-minute ring (the last point is
  // the minute in progress).
  let traffic = null, conns = null;
  const drawHistory = async () => {
    const r = await get("/broker/history");
    if (!current(gen)) return;
    const xs = r.points.map((p) => p.ts_ms);
    const tData = [xs, r.points.map((p) => p.messages_in_per_s), r.points.map((p) => p.messages_out_per_s)];
    const cData = [xs, r.points.map((p) => p.connections), r.points.map((p) => p.connects_per_s * 60)];
    if (!traffic) {
      traffic = timeChart(trafficBox, [{ name: "in", zero: true }, { name: "out", zero: true }], tData, { height: 200 });
      conns = timeChart(connBox, [{ name: "open connections", zero: true }, { name: "connects / min", zero: true }], cData, { height: 200 });
      onLeave(() => { traffic.destroy(); conns.destroy(); });
    } else {
      traffic.setData(tData, !traffic.zoomed());
      conns.setData(cData, !conns.zoomed());
    }
    // The whole hour, however little of it the ring holds yet.
    const now = Date.now();
    for (const c of [traffic, conns]) if (!c.zoomed()) c.plot.setScale("x", { min: now - 3600e3, max: now });
    trafficBox.dataset.points = String(xs.length);
  };

  // Alarms raised per hour over a day, by severity group, from the alarm
  // history (newest first, paged by `before`; at most 2,000 read).
  let alarmChart = null;
  const drawAlarms = async () => {
    const since = Date.now() - 24 * 3600e3;
    const items = [];
    let before = "";
    for (let i = 0; i < 4; i++) {
      const r = await get("/alarms" + query({ limit: 500, before }));
      items.push(...r.items);
      if (!r.next || !r.items.length || r.items[r.items.length - 1].created_ms < since) break;
      before = r.next;
    }
    if (!current(gen)) return;
    const hour = 3600e3;
    const first = Math.floor(since / hour) * hour;
    const xs = Array.from({ length: 25 }, (_, i) => first + i * hour);
    const severe = xs.map(() => 0), other = xs.map(() => 0);
    for (const a of items) {
      const i = Math.floor((a.created_ms - first) / hour);
      if (i < 0 || i >= xs.length) continue;
      if (a.severity === "critical" || a.severity === "major") severe[i] += 1; else other[i] += 1;
    }
    const data = [xs, severe, other];
    if (!alarmChart) {
      alarmChart = barChart(alarmChartBox, ["critical or major", "minor, warning, info"], data, { height: 200 });
      onLeave(() => alarmChart.destroy());
    } else alarmChart.setData(data);
  };

  // Top talkers: the devices with the most readings stored in the last
  // hour. The store counts points per metric; a message carries several
  // metrics, so a device's count is that of its busiest metric. The
  // metric names come from the series of a sample of devices.
  let metricNames = null;
  const drawTalkers = async () => {
    if (!metricNames) {
      const sampleDevs = (await get("/devices?limit=25")).items;
      const lists = await mapLimit(sampleDevs, 4, (d) => get("/devices/" + enc(d.id) + "/series").catch(() => ({ items: [] })));
      metricNames = [...new Set(lists.flatMap((l) => l.items.filter((x) => x.kind !== "string").map((x) => x.metric)))].sort();
    }
    const counts = new Map();
    const answers = await mapLimit(metricNames, 4, (m) =>
      get("/telemetry/aggregate" + query({ metric: m, from: "-1h", bucket: "1h", fn: "count" })).catch(() => ({ series: [] })));
    for (const a of answers) {
      for (const sr of a.series || []) {
        const n = sr.buckets.reduce((acc, b) => acc + (Number(b.count) || 0), 0);
        counts.set(sr.device, Math.max(counts.get(sr.device) || 0, n));
      }
    }
    if (!current(gen)) return;
    const top = [...counts].sort((a, b) => b[1] - a[1]).slice(0, 10);
    replace(talkersBox, table(["Device", h("th", { class: "num" }, "Readings"), h("th", { class: "num" }, "Per minute")], top.map(([d, n]) => h("tr", { "data-talker": d },
      h("td", {}, h("a", { href: "#/devices/" + enc(d) }, d)), h("td", { class: "num" }, String(n)),
      h("td", { class: "num" }, fmtRate(n / 60)))), "No readings in the last hour."));
  };

  // Gone silent: offline devices that were seen within the last day, the
  // most recently lost first.
  const drawSilent = async () => {
    const r = await get("/devices" + query({ online: "false", limit: 500 }));
    if (!current(gen)) return;
    const day = Date.now() - 24 * 3600e3;
    const lost = r.items.filter((d) => d.last_seen_ms && d.last_seen_ms > day).sort((a, b) => b.last_seen_ms - a.last_seen_ms).slice(0, 20);
    replace(silentBox, table(["Device", "Group", "Last seen", ""], lost.map((d) => h("tr", { "data-silent": d.id },
      h("td", {}, h("a", { href: "#/devices/" + enc(d.id) }, d.id)), h("td", {}, d.group || ""),
      h("td", { title: fmtTime(d.last_seen_ms) }, ago(d.last_seen_ms)), h("td", { class: "muted" }, fmtTime(d.last_seen_ms)))),
    "No device went silent in the last 24 h."));
  };

  // Alarm and connection changes arrive live and refresh the figures at
  // once; the message rate is sampled every 5 s, the charts every 30 s.
  let pending = null;
  const soon = () => { clearTimeout(pending); pending = setTimeout(() => { if (current(gen)) sample().catch(showError); }, 300); };
  live("", { alarm: soon, connections: soon, lagged: soon }, badge);
  await every(5000, sample);
  // A second sample soon, so the rate shows without waiting 5 s.
  setTimeout(() => { if (current(gen)) sample().catch(showError); }, 1000);
  every(30000, () => Promise.all([drawHistory(), drawAlarms(), drawSilent()]));
  every(60000, drawTalkers);
  every(30000, drawHealth);
}

// ---- Devices -----------------------------------------------------------------

async function devices(view, gen, parts, params) {
  const f = {
    search: params.get("search") || "", group: params.get("group") || "",
    profile: params.get("profile") || "", enabled: params.get("enabled") || "",
    online: params.get("online") || "",
  };
  // Cursors of the pages before this one, for "Previous".
  const trail = (params.get("trail") || "").split(",").filter(Boolean).map(decodeURIComponent);
  const after = params.get("after") || "";
  const hashFor = (extra) => "#/devices" + query({ ...f, ...extra });
  const search = h("input", { type: "search", placeholder: "Search id or name", value: f.search });
  const group = h("input", { placeholder: "Group", value: f.group, size: 12 });
  const profile = h("input", { placeholder: "Profile", value: f.profile, size: 12 });
  const enabled = h("select", {},
    h("option", { value: "" }, "enabled or not"), h("option", { value: "true" }, "enabled"), h("option", { value: "false" }, "disabled"));
  enabled.value = f.enabled;
  const online = h("select", { name: "online" },
    h("option", { value: "" }, "online or not"), h("option", { value: "true" }, "online"), h("option", { value: "false" }, "offline"));
  online.value = f.online;
  const apply = () => go("#/devices" + query({
    search: search.value.trim(), group: group.value.trim(), profile: profile.value.trim(), enabled: enabled.value,
    online: online.value,
  }));
  let debounce = null;
  search.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(apply, 400); });
  for (const el of [group, profile]) el.addEventListener("change", apply);
  enabled.addEventListener("change", apply);
  online.addEventListener("change", apply);
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  replace(view, h("h1", {}, "Devices"), h("div", { class: "toolbar" }, search, group, profile, enabled, online), body);
  const r = await get("/devices" + query({ ...f, limit: 50, after }));
  if (!current(gen)) return;
  const rows = r.items.map((d) => h("tr", {},
    h("td", {}, h("a", { href: "#/devices/" + enc(d.id) }, d.id)),
    h("td", {}, d.name || ""), h("td", {}, d.group || ""), h("td", {}, d.profile || ""),
    h("td", {}, h("span", { class: "dot" + (d.online ? " on" : ""), title: d.online ? "online" : "offline" }), d.enabled ? "" : " disabled"),
    h("td", { title: fmtTime(d.last_seen_ms) }, ago(d.last_seen_ms))));
  const prev = trail.length ? trail[trail.length - 1] : null;
  replace(body,
    table(["Id", "Name", "Group", "Profile", "Online", "Last seen"], rows, "No device matches."),
    h("div", { class: "pager" },
      h("button", { type: "button", disabled: !after, onclick: () => go(hashFor({ after: prev, trail: trail.slice(0, -1).map(enc).join(",") })) }, "Previous"),
      h("button", { type: "button", disabled: !r.next, onclick: () => go(hashFor({ after: r.next, trail: [...trail, after].map(enc).join(",") })) }, "Next"),
      h("span", { class: "muted" }, r.total + " devices in all")));
}

// ---- One device ----------------------------------------------------------------

// The history chart's ranges. Short ones read raw points and follow the
// live stream (a live tail); long ones read buckets (answered from the
// store's 1 min and 1 h rollups) and show each metric's min–max band.
const RANGES = {
  "15m": { ms: 15 * 60e3, raw: true, bucket: "5s" },
  "1h": { ms: 3600e3, raw: true, bucket: "15s" },
  "6h": { ms: 6 * 3600e3, bucket: "1m" },
  "24h": { ms: 24 * 3600e3, bucket: "5m" },
  "7d": { ms: 7 * 86400e3, bucket: "30m" },
  "30d": { ms: 30 * 86400e3, bucket: "2h" },
};
// Bucket widths a zoomed-in view may use, finest first (whole minutes and
// hours come from the rollups).
const BUCKETS = [["5s", 5e3], ["15s", 15e3], ["1m", 60e3], ["5m", 300e3], ["15m", 900e3], ["30m", 1800e3], ["1h", 3600e3], ["2h", 7200e3]];
const RAW_LIMIT = 5000;
const TERMINAL = ["answered", "failed", "timed_out"];

async function device(view, gen, parts, params) {
  const id = parts[1];
  const path = "/devices/" + enc(id);
  const range = RANGES[params.get("range")] ? params.get("range") : "1h";
  const meta = h("div", {}, "Loading…");
  const creds = h("div", {});
  const latest = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const charts = h("div", {});
  const events = h("div", {});
  const connections = h("div", {});
  const alarmBox = h("div", {});
  const commands = h("div", {});
  const shadowBox = h("div", {});
  const diagBox = h("div", {});
  const badge = liveBadge();
  const rangeTabs = h("div", { class: "tabs", role: "group", "aria-label": "Time range" }, Object.keys(RANGES).map((k) =>
    h("a", { href: "#/devices/" + enc(id) + "?range=" + k, class: k === range ? "active" : null, "data-range": k,
      "aria-current": k === range ? "true" : null }, k)));
  replace(view,
    h("h1", {}, "Device ", h("code", {}, id), " ", badge), meta,
    h("h2", {}, "Latest values"), latest,
    h("h2", {}, "Active alarms"), alarmBox,
    h("h2", {}, "Commands"), commands,
    h("h2", {}, "Shadows"), shadowBox,
    h("h2", {}, "Diagnostics"), diagBox,
    h("h2", { id: "history" }, "History"), rangeTabs, charts,
    h("h2", {}, "Connection history"), connections,
    h("h2", {}, "Credentials"), creds,
    h("h2", {}, "Events"), events);

  const d = await get(path);
  if (!current(gen)) return;
  const labels = Object.entries(d.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
  const online = h("td", { class: "online" }, d.online ? "yes" : "no");
  const lastSeen = h("td", {}, d.last_seen_ms ? fmtTime(d.last_seen_ms) + " (" + ago(d.last_seen_ms) + ")" : "never");
  const lastAddr = h("td", {}, d.last_addr || "—");
  const row = (k, v) => h("tr", {}, h("th", {}, k), v instanceof Node ? v : h("td", {}, v));
  replace(meta, h("table", {}, h("tbody", {},
    row("Name", d.name), row("Tenant", d.tenant), row("Group", d.group || "—"), row("Profile", d.profile || "—"),
    row("Labels", labels || "—"), row("Enabled", d.enabled ? "yes" : "no"),
    row("Online", online), row("Created", fmtTime(d.created_ms)),
    row("Last seen", lastSeen), row("Last address", lastAddr),
    row("Position", h("td", {}, h("a", { href: "#/map?track=" + enc(id) }, "Track on the map"))),
    row("Dashboard", h("td", { class: "profile-dashboard" }, "—")),
    row("MQTT session", h("td", { class: "session" }, d.session ? "Loading…" : "none")))));
  if (d.profile) {
    get("/dashboards" + query({ profile: d.profile, tenant: d.tenant })).then((r) => {
      const b = r.items[0];
      if (b && current(gen)) replace(meta.querySelector("td.profile-dashboard"), h("a", { href: "#/dashboards/" + enc(b.id) + "?device=" + enc(id) }, b.name));
    }).catch(() => {});
  }
  if (d.session) {
    get("/sessions/" + enc(id)).then((sess) => {
      if (current(gen)) replace(meta.querySelector("td.session"), sessionPanel(sess));
    }).catch(() => {
      if (current(gen)) replace(meta.querySelector("td.session"), sessionPanel(d.session));
    });
  }

  const loadCreds = async () => {
    const [tokens, certs] = await Promise.all([get(path + "/tokens"), get(path + "/certificates")]);
    if (!current(gen)) return;
    replace(creds,
      h("div", { class: "toolbar" }, writeButton("Issue token", async () => {
        const r = await api("POST", path + "/tokens", {});
        await loadCreds();
        replace(creds.querySelector(".issued"), h("div", { class: "secret" },
          "New token ", h("code", {}, r.token.id), " — secret (shown once): ", h("code", {}, r.secret)));
      })),
      h("div", { class: "issued" }),
      table(["Token", "Created", "Expires", "State", ""], tokens.items.map((t) => h("tr", {},
        h("td", {}, h("code", {}, t.id)), h("td", {}, fmtTime(t.created_ms)),
        h("td", {}, t.expires_ms ? fmtTime(t.expires_ms) : "never"), h("td", {}, t.revoked ? "revoked" : "valid"),
        h("td", {}, t.revoked ? null : writeButton("Revoke", async () => {
          if (!confirm("Revoke token " + t.id + "? Live sessions using it are dropped.")) return;
          await api("DELETE", path + "/tokens/" + enc(t.id));
          await loadCreds();
        }, "danger")))), "No tokens."),
      h("p", {}),
      table(["Certificate (SHA-256)", "Serial", "Not after", "State", ""], certs.items.map((c) => h("tr", {},
        h("td", {}, h("code", {}, c.fingerprint.slice(0, 16) + "…")), h("td", {}, h("code", {}, c.serial_hex)),
        h("td", {}, fmtTime(c.not_after_ms)), h("td", {}, c.revoked_ms ? "revoked " + fmtTime(c.revoked_ms) : "valid"),
        h("td", {}, c.revoked_ms ? null : writeButton("Revoke", async () => {
          if (!confirm("Revoke this certificate? Live sessions using it are dropped.")) return;
          await api("DELETE", path + "/certificates/" + enc(c.fingerprint));
          await loadCreds();
        }, "danger")))), "No certificates."));
  };

  // Latest values: loaded once, then kept current by the live stream; each
  // numeric metric has a live chart of what arrived over the last minutes.
  const values = new Map(); // metric → { value, kind, ts_ms, spark: [[ts, v]] }
  const SPARK_MS = 5 * 60 * 1000;
  const drawLatest = () => {
    const rows = [...values.keys()].sort().map((m) => {
      const v = values.get(m);
      return h("tr", { "data-metric": m, class: v.fresh ? "fresh" : null },
        h("td", {}, m), h("td", { class: "num value" }, fmtValue(v.value)), h("td", { class: "muted" }, v.kind),
        h("td", { title: fmtTime(v.ts_ms) }, ago(v.ts_ms)),
        h("td", {}, v.kind === "float" ? sparkline(v.spark) : null));
    });
    for (const v of values.values()) v.fresh = false;
    replace(latest, table(["Metric", "Value", "Kind", "Time", "Live (5 min)"], rows, "No telemetry yet."));
  };
  const kindOf = (v) => (typeof v === "number" ? "float" : typeof v === "boolean" ? "bool" : "string");
  const setValue = (m, value, ts, kind) => {
    const cur = values.get(m) || { spark: [] };
    if (cur.ts_ms && ts < cur.ts_ms) return;
    const spark = cur.spark;
    if (typeof value === "number") {
      spark.push([ts, value]);
      while (spark.length && spark[0][0] < ts - SPARK_MS) spark.shift();
      if (spark.length > 600) spark.splice(0, spark.length - 600);
    }
    values.set(m, { value, kind: kind || kindOf(value), ts_ms: ts, spark, fresh: true });
  };
  let charted = "";
  let history = null;
  const loadLatest = async () => {
    const r = await get(path + "/telemetry");
    if (!current(gen)) return;
    for (const m of r.items) setValue(m.metric, m.value, m.ts_ms, m.kind);
    // Seed the live charts with the last minutes of raw points.
    const numeric = r.items.filter((m) => m.kind === "float").map((m) => m.metric).sort();
    const seeds = await Promise.all(numeric.map((m) =>
      get(path + "/telemetry/" + enc(m) + query({ from: "-5m", limit: 600 })).catch(() => ({ points: [] }))));
    if (!current(gen)) return;
    numeric.forEach((m, i) => {
      const v = values.get(m);
      const pts = (seeds[i].points || []).filter((p) => typeof p[1] === "number");
      if (v && pts.length) v.spark = pts.concat(v.spark.filter((p) => p[0] > pts[pts.length - 1][0]));
    });
    drawLatest();
    if (numeric.join("\n") !== charted) {
      charted = numeric.join("\n");
      if (history) history.destroy();
      history = historyPanel(charts, id, range, numeric, gen);
      await history.load();
    }
  };

  const loadAlarms = async () => {
    const r = await get("/alarms" + query({ device: id, status: "active", limit: 20 }));
    if (!current(gen)) return;
    replace(alarmBox, alarmTable(r.items, "active", loadAlarms, "No active alarms."));
  };

  const loadCommands = async () => {
    const r = await get(path + "/commands?limit=20");
    if (!current(gen)) return;
    replace(commandList, table(["Sent", "Command", "Params", "Status", "Response / error"], r.items.map((c) => h("tr", {},
      h("td", {}, fmtTime(c.created_ms)), h("td", {}, c.name), h("td", {}, h("code", {}, json(c.params))),
      h("td", {}, c.status), h("td", {}, h("code", {}, c.error || json(c.response))))), "No commands."));
  };
  const commandList = h("div", {});
  replace(commands, canWrite() ? commandForm(path, gen, loadCommands) : null, commandList);

  // Shadows: desired, reported and delta side by side; operators edit
  // desired as JSON, sent with the version they saw (a concurrent change
  // is refused rather than overwritten).
  const loadShadows = async () => {
    const names = (await get(path + "/shadows")).items;
    if (!names.includes("")) names.unshift("");
    const docs = await Promise.all(names.map((n) =>
      get(path + "/shadow" + (n ? "/" + enc(n) : "")).catch(() => null)));
    if (!current(gen)) return;
    // A reload (live shadow events, the slow poll) keeps what an operator
    // is typing.
    const drafts = {};
    for (const card of shadowBox.querySelectorAll(".card.shadow")) {
      const t = card.querySelector("textarea");
      if (t && t.value) drafts[card.dataset.shadow] = t.value;
    }
    replace(shadowBox, names.map((n, i) => {
      const d = docs[i];
      const st = (d && d.state) || {};
      const editor = h("textarea", { class: "shadow-desired", rows: 3, cols: 60, placeholder: '{"setpoint": 21}' });
      editor.value = drafts[n || "(classic)"] || "";
      const form = canWrite() ? h("form", { class: "shadow-form" }, editor, " ",
        h("button", { type: "submit" }, "Merge into desired")) : null;
      if (form) form.addEventListener("submit", act(async (e) => {
        e.preventDefault();
        let desired;
        try { desired = JSON.parse(editor.value || "{}"); } catch (err) { throw new Error("desired must be JSON: " + err.message); }
        const body = { state: { desired } };
        if (d) body.version = d.version;
        await api("PATCH", path + "/shadow" + (n ? "/" + enc(n) : ""), body);
        editor.value = "";
        await loadShadows();
      }));
      return h("div", { class: "card shadow", "data-shadow": n || "(classic)" },
        h("strong", {}, n || "classic"), " ",
        h("span", { class: "muted" }, d ? "version " + d.version + ", " + fmtTime(d.timestamp_ms) : "no shadow yet"),
        table(["Desired", "Reported", "Delta"], [h("tr", {},
          h("td", {}, h("pre", {}, json(st.desired || {}))),
          h("td", { class: "reported" }, h("pre", {}, json(st.reported || {}))),
          h("td", { class: "delta" }, h("pre", {}, st.delta ? json(st.delta) : "—")))], ""),
        form);
    }));
  };

  const loadEvents = async () => {
    const r = await get(path + "/events?limit=20");
    if (!current(gen)) return;
    replace(events, table(["Time", "Kind", "Detail"], r.items.map((e) => h("tr", {},
      h("td", {}, fmtTime(e.ts_ms)), h("td", {}, e.kind), h("td", {}, h("pre", {}, e.detail)))), "No events."));
  };

  const connHistory = [];
  const drawConnections = () => replace(connections, table(["Time", "", "Detail"], connHistory.slice(0, 20).map((e) => h("tr", {},
    h("td", {}, fmtTime(e.ts_ms)), h("td", {}, h("span", { class: "dot" + (e.online ? " on" : "") })), h("td", {}, e.detail))),
  "No connections recorded yet."));
  const loadConnections = async () => {
    const r = await get(path + "/events" + query({ kind: "connection", limit: 20 }));
    if (!current(gen)) return;
    connHistory.splice(0, connHistory.length, ...r.items.map((e) => ({ ts_ms: e.ts_ms, online: !e.detail.startsWith("disconnected"), detail: e.detail })));
    drawConnections();
  };

  live("?device=" + enc(id), {
    telemetry: (ev) => {
      for (const [m, p] of Object.entries(ev.values)) {
        setValue(m, p.value, p.ts_ms);
        if (history && typeof p.value === "number") history.tail(m, p.ts_ms, p.value);
      }
      drawLatest();
      replace(lastSeen, fmtTime(ev.ts_ms) + " (just now)");
    },
    connection: (ev) => {
      replace(online, ev.online ? "yes" : "no");
      if (ev.online) replace(lastAddr, ev.detail.replace(/^connected from (\S+).*$/, "$1"));
      connHistory.unshift(ev);
      drawConnections();
    },
    alarm: () => loadAlarms().catch(showError),
    // A changed shadow (the device reported, someone set desired): at most
    // one event per shadow every 250 ms.
    shadow: () => loadShadows().catch(showError),
    lagged: () => Promise.all([loadLatest(), loadConnections(), loadAlarms(), loadShadows()]).catch(showError),
  }, badge);

  // Diagnostic bundles: ask the device for one, watch it arrive, download it.
  const reasonIn = h("input", { name: "reason", placeholder: "why (optional)" });
  const askForm = canWrite() ? h("form", { class: "toolbar diag-form" }, reasonIn,
    h("button", { type: "submit" }, "Request a bundle")) : null;
  if (askForm) askForm.addEventListener("submit", act(async (ev) => {
    ev.preventDefault();
    await api("POST", path + "/diagnostics", reasonIn.value ? { reason: reasonIn.value } : {});
    reasonIn.value = "";
    await loadDiagnostics();
  }));
  const download = async (b) => {
    const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
    const resp = await fetch("/api/v1" + path + "/diagnostics/" + enc(b.id) + "/content", { headers });
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    const url = URL.createObjectURL(await resp.blob());
    const a = h("a", { href: url, download: id + "-" + b.id + ".bin" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  };
  const loadDiagnostics = async () => {
    const r = await get(path + "/diagnostics");
    if (!current(gen)) return;
    replace(diagBox, askForm, table(["Requested", "By", "Reason", "Status", "Size", "SHA-256", ""], r.items.map((b) => h("tr", { "data-bundle": b.id },
      h("td", {}, fmtTime(b.requested_ms)), h("td", {}, b.requested_by), h("td", {}, b.reason || ""),
      h("td", { class: "status" }, b.status, b.error ? h("div", { class: "muted small" }, b.error) : null),
      h("td", { class: "num" }, b.size != null ? fmtBytes(b.size) : "—"),
      h("td", {}, b.sha256 ? h("code", { title: b.sha256 }, b.sha256.slice(0, 12) + "…") : "—"),
      h("td", {}, b.status === "uploaded" ? h("button", { type: "button", onclick: act(() => download(b)) }, "Download") : null))),
    "No diagnostic bundles."));
  };

  await Promise.all([loadCreds(), loadEvents(), loadLatest(), loadConnections(), loadAlarms(),
    every(10000, loadCommands), every(30000, loadShadows), every(5000, loadDiagnostics)]);
  // The "ago" column ages without new data; the live stream does the rest.
  every(5000, async () => drawLatest());
  // Long ranges have no live tail: read them again each minute (unless
  // the operator is looking at a zoomed window).
  every(60000, async () => { if (history && !RANGES[range].raw && !history.zoomed()) await history.load(); });
}

// A small live chart: the values of the last minutes, no axes.
function sparkline(points) {
  const W = 160, H = 32;
  if (points.length < 2) return h("span", { class: "muted" }, points.length ? "…" : "");
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  let lo = Math.min(...points.map((p) => p[1])), hi = Math.max(...points.map((p) => p[1]));
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (t) => 1 + ((t - t0) / Math.max(1, t1 - t0)) * (W - 2);
  const y = (v) => 1 + (1 - (v - lo) / (hi - lo)) * (H - 2);
  return s("svg", { class: "spark", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" },
    s("title", {}, points.length + " points, " + fmtValue(lo) + " to " + fmtValue(hi)),
    s("polyline", { class: "avg", points: points.map((p) => x(p[0]) + "," + y(p[1])).join(" ") }));
}

function commandForm(path, gen, reload) {
  const name = h("input", { placeholder: "name, e.g. reboot", required: true });
  const params = h("textarea", { class: "code", rows: 3, placeholder: "{\"key\": \"value\"}" });
  const timeout = h("input", { type: "number", min: 1, value: 30, size: 5 });
  const status = h("p", {});
  const form = h("form", { class: "stack card" },
    h("label", {}, "Command", name),
    h("label", {}, "Parameters (JSON)", params),
    h("label", {}, "Timeout (s)", timeout),
    h("div", {}, h("button", { class: "primary", type: "submit" }, "Send")), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let p = {};
    try { p = params.value.trim() ? JSON.parse(params.value) : {}; } catch (e) {
      replace(status, h("span", { class: "error" }, "Parameters are not JSON: " + e.message));
      return;
    }
    try {
      const c = await api("POST", path + "/commands", { name: name.value.trim(), params: p, timeout_secs: Number(timeout.value) || 30 });
      replace(status, "Command ", h("code", {}, c.id), ": ", c.status || "pending");
      await reload();
      // Poll until the device answers or the command times out.
      const poll = setInterval(async () => {
        if (!current(gen)) return clearInterval(poll);
        try {
          const now = await get("/commands/" + enc(c.id));
          if (!current(gen)) return;
          replace(status, "Command ", h("code", {}, c.id), ": ", h("strong", {}, now.status),
            now.error ? " — " + now.error : "", now.response !== null && now.response !== undefined ? " — " + json(now.response) : "");
          if (TERMINAL.includes(now.status)) { clearInterval(poll); await reload(); }
        } catch (e) { clearInterval(poll); showError(e); }
      }, 1000);
      state.timers.push(poll);
    } catch (e) {
      replace(status, h("span", { class: "error" }, e.message));
    }
  });
  return form;
}

// A session as an operator reads it: state, protocol, persistence and
// expiry, queues, and the subscriptions as a table.
function sessionPanel(sess) {
  const facts = [
    ["State", sess.online ? "connected" : "offline" + (sess.offline_seconds !== undefined ? " for " + fmtDuration(sess.offline_seconds) : "")],
    sess.protocol ? ["Protocol", "MQTT " + sess.protocol] : null,
    sess.persistent !== undefined ? ["Session", sess.persistent
      ? "persistent" + (sess.expiry_interval ? ", kept " + fmtDuration(sess.expiry_interval) + " after disconnecting" : "")
      : "clean (ends with the connection)"] : null,
    ["Queued messages", String(sess.queued ?? 0)],
    ["In flight", String(sess.inflight ?? 0)],
    ["Dropped (queue full)", String(sess.dropped ?? 0)],
  ].filter(Boolean);
  const subs = sess.subscriptions || [];
  return h("div", { class: "session-panel" },
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    subs.length
      ? table(["Subscribed to", "QoS"], subs.map((x) => h("tr", {}, h("td", {}, h("code", {}, x.filter)), h("td", { class: "num" }, String(x.qos)))))
      : h("p", { class: "muted" }, "No subscriptions."));
}

// The history chart of a device: metrics to pick (several on one chart),
// the data of the chosen range, drag-to-zoom (a zoom into a long range
// reads finer buckets for the window), pan, and a live tail on short
// ranges. Returns { load, tail(metric, ts, value), destroy }.
function historyPanel(box, id, rangeKey, metrics, gen) {
  const range = RANGES[rangeKey];
  const key = "m2mhub.chart." + id;
  let chosen = (sessionStorage.getItem(key) || "").split(",").filter((m) => metrics.includes(m));
  if (!chosen.length) chosen = metrics.slice(0, 2);
  const picks = h("div", { class: "metric-picks", role: "group", "aria-label": "Metrics on the chart" }, metrics.map((m) => {
    const cb = h("input", { type: "checkbox", value: m, name: "metric" });
    cb.checked = chosen.includes(m);
    cb.addEventListener("change", () => {
      chosen = metrics.filter((x) => picks.querySelector(`input[value="${CSS.escape(x)}"]`).checked);
      sessionStorage.setItem(key, chosen.join(","));
      load().catch(showError);
    });
    return h("label", {}, cb, m);
  }));
  const status = h("span", { class: "muted small" });
  const plotBox = h("div", { class: "chart-box", "data-chart": "history", "data-range": rangeKey, "aria-label": "History chart: drag to zoom, arrow keys to pan, 0 to reset" });
  const btn = (label, title, f) => h("button", { type: "button", title, onclick: f }, label);
  let chart = null;
  const tools = h("div", { class: "toolbar" },
    btn("◀", "Pan left (←)", () => chart && chart.pan(-0.25)),
    btn("▶", "Pan right (→)", () => chart && chart.pan(0.25)),
    btn("Zoom in", "Zoom in (+)", () => chart && chart.zoom(0.5)),
    btn("Reset zoom", "Whole range (0, or double-click)", () => chart && chart.reset()),
    status);
  replace(box, picks, tools, plotBox);

  // One metric's table for uPlot: [xs, avg] or, with the band, [xs, avg, min, max].
  const fetchMetric = async (m, from, to, bucket, raw) => {
    if (raw) {
      const r = await get("/devices/" + enc(id) + "/telemetry/" + enc(m) + query({ from, to, limit: RAW_LIMIT }));
      // More than a page: too dense to draw raw, read buckets instead.
      if (!r.next) {
        const pts = r.points.filter((p) => typeof p[1] === "number");
        return { band: false, cols: [pts.map((p) => p[0]), pts.map((p) => p[1])] };
      }
    }
    const r = await get("/telemetry/aggregate" + query({ metric: m, device: id, from, to, bucket, fn: "avg,min,max" }));
    const b = (((r.series || [])[0] || {}).buckets || []).filter((x) => typeof x.avg === "number");
    const half = (r.bucket_ms || 0) / 2;
    return { band: !raw, cols: [b.map((x) => x.ts_ms + half), b.map((x) => x.avg), b.map((x) => x.min), b.map((x) => x.max)].slice(0, raw ? 2 : 4) };
  };

  let shown = []; // metrics in the chart, in order
  let detail = false; // the data is a zoomed window read finer, not the range
  let tables = []; // their tables, for the live tail
  let loadedSpan = null;
  const load = async (from = "-" + (range.ms / 60e3) + "m", to = "now", bucket = range.bucket, raw = !!range.raw, keepScale = false) => {
    const list = chosen.slice();
    if (!list.length) {
      if (chart) { chart.destroy(); chart = null; }
      replace(plotBox, h("p", { class: "muted" }, "Choose a metric."));
      return;
    }
    replace(status, "loading…");
    const results = await Promise.all(list.map((m) => fetchMetric(m, from, to, bucket, raw).catch((e) => ({ error: e.message, band: false, cols: [[], []] }))));
    if (!current(gen)) return;
    const errors = results.filter((r) => r.error).map((r) => r.error);
    replace(status, errors.length ? h("span", { class: "error" }, errors[0]) : (raw ? "raw points" : "avg and min–max per " + bucket) + (range.raw ? ", live" : ""));
    tables = results.map((r) => r.cols);
    const data = align(tables);
    const metricsDef = list.map((m, i) => ({ name: m, band: results[i].band }));
    // A long range shows all of itself, however little data it holds.
    const whole = !keepScale && !raw ? [Date.now() - range.ms, Date.now()] : null;
    const sameShape = chart && shown.length === list.length && shown.every((x, i) => x.name === metricsDef[i].name && x.band === metricsDef[i].band);
    if (chart && sameShape && keepScale) {
      chart.setData(data, false);
    } else {
      if (chart) chart.destroy();
      plotBox.replaceChildren();
      chart = timeChart(plotBox, metricsDef, data, { onZoom, onReset, span: whole });
    }
    shown = metricsDef;
    plotBox.dataset.metrics = list.join(",");
    plotBox.dataset.points = String(data[0].length);
    if (!keepScale) loadedSpan = whole || (data[0].length ? [data[0][0], data[0][data[0].length - 1]] : null);
    detail = keepScale;
  };

  // Zoom out: the whole range again (read anew if a zoom replaced it).
  const onReset = () => {
    if (detail) load().catch(showError);
    else if (chart && loadedSpan) chart.plot.setScale("x", { min: loadedSpan[0], max: loadedSpan[1] });
  };

  // A zoom into a long range: once the operator stops, read the window
  // again with buckets about 300 to the width (never finer than 5 s).
  let zoomTimer = null;
  let lastDetail = null; // [bucket, min, max] of the last window read finer
  const onZoom = (min, max, zoomed) => {
    plotBox.dataset.view = Math.round(min) + "-" + Math.round(max);
    if (range.raw || !zoomed || !loadedSpan) return;
    clearTimeout(zoomTimer);
    zoomTimer = setTimeout(() => {
      if (!current(gen)) return;
      const want = (max - min) / 300;
      const b = BUCKETS.find(([, ms]) => ms >= want) || BUCKETS[BUCKETS.length - 1];
      if (b[0] === range.bucket) return;
      // Already read at this resolution for a window that covers it.
      if (detail && lastDetail && b[0] === lastDetail[0] && min >= lastDetail[1] && max <= lastDetail[2]) return;
      lastDetail = [b[0], min, max];
      load(String(Math.floor(min)), String(Math.ceil(max)), b[0], false, true)
        .then(() => { if (chart) chart.plot.setScale("x", { min, max }); })
        .catch(showError);
    }, 500);
  };

  const destroy = () => { clearTimeout(zoomTimer); if (chart) { chart.destroy(); chart = null; } };
  onLeave(destroy);
  return {
    load: () => load(),
    destroy,
    zoomed: () => detail || (!!chart && chart.zoomed()),
    // A live value: appended on short ranges; the oldest beyond the range
    // fall off (unless the operator zoomed, who keeps what they look at).
    tail(m, ts, v) {
      if (!range.raw || !chart) return;
      const i = shown.findIndex((x) => x.name === m);
      if (i < 0) return;
      const t = tables[i];
      if (t[0].length && ts <= t[0][t[0].length - 1]) return;
      t[0].push(ts);
      t[1].push(v);
      const cut = ts - range.ms;
      while (t[0].length && t[0][0] < cut) { t[0].shift(); t[1].shift(); }
      const data = align(tables);
      plotBox.dataset.points = String(data[0].length);
      chart.setData(data, !chart.zoomed());
    },
  };
}

// ---- Map -----------------------------------------------------------------------

async function map(view, gen, parts, params) {
  const badge = liveBadge();
  const box = h("div", { class: "map", id: "fleet-map", role: "application", "aria-label": "Map of the fleet" });
  const summary = h("span", { class: "muted" });
  const fitBtn = h("button", { type: "button" }, "Fit the fleet");
  // Track replay: a device, a range, the path, and a scrubber.
  const trackDevice = h("select", { name: "track-device", "aria-label": "Device" }, h("option", { value: "" }, "device…"));
  const trackRange = h("select", { name: "track-range", "aria-label": "Range" },
    ["15m", "1h", "6h", "24h", "7d"].map((r) => h("option", { value: r }, "last " + r)));
  trackRange.value = params.get("range") || "1h";
  const showBtn = h("button", { type: "button", class: "primary" }, "Show track");
  const playBtn = h("button", { type: "button", disabled: true, "aria-pressed": "false" }, "Play");
  const scrub = h("input", { type: "range", min: 0, max: 0, value: 0, step: 1, disabled: true, "aria-label": "Replay position" });
  const when = h("span", { class: "muted small", "aria-live": "polite" });
  const drawBtn = h("button", { type: "button", "aria-pressed": "false" }, "Draw geofence");
  const makeBtn = h("button", { type: "button", class: "primary", disabled: true }, "Make a rule");
  const clearBtn = h("button", { type: "button" }, "Clear");
  const corners = h("span", { class: "muted small", "aria-live": "polite" });
  replace(view, h("h1", {}, "Map ", badge),
    h("div", { class: "toolbar" }, fitBtn, summary),
    box,
    canWrite() ? h("section", { class: "fence-panel card" },
      h("h2", {}, "New geofence"),
      h("p", { class: "muted small" }, "Draw an area on the map, corner by corner, then make it a rule that raises an alarm when a device leaves it."),
      h("div", { class: "toolbar" }, drawBtn, makeBtn, clearBtn, corners)) : null,
    h("section", { class: "track-panel card" },
      h("h2", {}, "Route replay"),
      h("div", { class: "toolbar" }, trackDevice, trackRange, showBtn),
      h("div", { class: "toolbar" }, playBtn, scrub, when)),
    h("p", { class: "muted small" }, "Devices at their latest position (clustered; click a cluster to zoom in); the rules' geofences (inside(lat, lon, 'POLYGON…')) as dashed areas. Without tiles the embedded basemap (Natural Earth) shows coastlines and borders."));

  const config = await consoleConfig().catch(() => ({}));
  if (!current(gen)) return;
  const lm = await createMap(box, config);
  if (!current(gen)) { lm.remove(); return; }
  onLeave(() => lm.remove());
  const fleet = fleetLayer(lm, (id) => go("#/devices/" + enc(id)));
  // A geofence drawn here becomes a rule: "outside this polygon" in WKT,
  // longitude first, as inside() reads it.
  const drawer = fenceDrawer(lm);
  const showCorners = () => {
    replace(corners, drawer.count() ? drawer.count() + " corners" : "");
    makeBtn.disabled = drawer.count() < 3;
  };
  lm.on("click", showCorners);
  drawBtn.addEventListener("click", () => {
    const on = drawBtn.getAttribute("aria-pressed") !== "true";
    drawBtn.setAttribute("aria-pressed", String(on));
    drawer.setOn(on);
  });
  clearBtn.addEventListener("click", () => { drawer.clear(); showCorners(); });
  makeBtn.addEventListener("click", () => {
    const wkt = "POLYGON((" + drawer.ring().map(([lon, lat]) => lon.toFixed(5) + " " + lat.toFixed(5)).join(", ") + "))";
    const sql = "SELECT device, lat, lon FROM 'devices/+/telemetry' WHERE NOT inside(lat, lon, '" + wkt + "')";
    go("#/rules/new" + query({ name: "geofence", sql }));
  });
  box.leafletFleet = fleet; // for the browser tests' performance check
  let fitted = false;
  const fit = () => {
    fleet.flush();
    const b = fleet.bounds();
    if (b.isValid()) lm.fitBounds(b, { padding: [40, 40], maxZoom: 12 });
  };
  fitBtn.addEventListener("click", fit);

  // One aggregate per coordinate gives every device's last value at once,
  // instead of one request per device.
  const lastOf = async (metric) => {
    const r = await get("/telemetry/aggregate" + query({ metric, from: "-24h", bucket: "1d", fn: "last" }));
    const out = new Map();
    for (const sr of r.series || []) {
      const b = sr.buckets.filter((x) => typeof x.last === "number").sort((a, c) => a.ts_ms - c.ts_ms).pop();
      if (b) out.set(sr.device, b.last);
    }
    return out;
  };
  let fences = null;
  const valid = (lat, lon) => Math.abs(lat) <= 90 && Math.abs(lon) <= 180;
  const refreshDevices = () => {
    replace(summary, fleet.count() + " devices with a position");
    const ids = fleet.ids();
    if (trackDevice.options.length - 1 !== ids.length) {
      const keep = trackDevice.value || params.get("track") || "";
      replace(trackDevice, h("option", { value: "" }, "device…"), ids.map((d) => h("option", { value: d }, d)));
      if (keep && !ids.includes(keep)) trackDevice.appendChild(h("option", { value: keep }, keep));
      trackDevice.value = keep;
    }
  };
  const load = async () => {
    const [lat, lon, rs] = await Promise.all([lastOf("lat"), lastOf("lon"), get("/rules").catch(() => ({ items: [] }))]);
    if (!current(gen)) return;
    if (fences) fences.remove();
    fences = fenceLayer(lm, rs.items.flatMap((r) => geofences(r.sql || "").map((ring) => ({ rule: r.name || r.id, ring }))));
    const list = [];
    for (const [d, v] of lat) if (lon.has(d) && valid(v, lon.get(d))) list.push({ id: d, lat: v, lon: lon.get(d) });
    fleet.update(list);
    fleet.flush();
    if (!fitted && list.length && !params.get("track")) { fitted = true; fit(); }
    refreshDevices();
    box.dataset.loaded = "true";
  };
  live("", {
    positions: (ev) => {
      fleet.update(ev.items.filter((p) => valid(p.lat, p.lon)).map((p) => ({ id: p.device, lat: p.lat, lon: p.lon })));
      refreshDevices();
    },
    lagged: () => load().catch(showError),
  }, badge);

  // A device's stored path: raw lat and lon points of the range, paired
  // by timestamp (a reading carries both), at most 20,000 of each.
  let track = null, points = [], playing = null;
  const stop = () => { clearInterval(playing); playing = null; playBtn.setAttribute("aria-pressed", "false"); replace(playBtn, "Play"); };
  const seek = (i) => {
    if (!track || !points.length) return;
    const k = Math.max(0, Math.min(points.length - 1, i));
    scrub.value = String(k);
    track.seek(k);
    replace(when, fmtTime(points[k][0]) + " · " + (k + 1) + " of " + points.length);
    box.dataset.replayAt = String(k);
  };
  const readAll = async (id, metric, from) => {
    const out = [];
    let cursor = "";
    for (let page = 0; page < 4; page++) {
      const r = await get("/devices/" + enc(id) + "/telemetry/" + enc(metric) + query({ from, limit: 5000, cursor }));
      out.push(...r.points);
      if (!r.next) break;
      cursor = r.next;
    }
    return out;
  };
  const showTrack = async () => {
    const id = trackDevice.value;
    if (!id) return;
    stop();
    const from = "-" + trackRange.value;
    const [lats, lons] = await Promise.all([readAll(id, "lat", from), readAll(id, "lon", from)]);
    if (!current(gen)) return;
    const lonAt = new Map(lons.map((p) => [p[0], p[1]]));
    points = lats.filter((p) => typeof p[1] === "number" && typeof lonAt.get(p[0]) === "number" && valid(p[1], lonAt.get(p[0])))
      .map((p) => [p[0], p[1], lonAt.get(p[0])]);
    if (track) { track.remove(); track = null; }
    if (!points.length) {
      replace(when, "No position of " + id + " in the last " + trackRange.value + ".");
      scrub.disabled = playBtn.disabled = true;
      return;
    }
    track = trackLayer(lm, id, points);
    scrub.max = String(points.length - 1);
    scrub.disabled = playBtn.disabled = false;
    box.dataset.track = id;
    box.dataset.trackPoints = String(points.length);
    seek(0);
  };
  onLeave(stop);
  showBtn.addEventListener("click", act(showTrack));
  scrub.addEventListener("input", () => { stop(); seek(Number(scrub.value)); });
  // Play: the whole track in about 20 s, whatever its length.
  playBtn.addEventListener("click", () => {
    if (playing) return stop();
    if (Number(scrub.value) >= points.length - 1) seek(0);
    const step = Math.max(1, Math.round(points.length / 400));
    playBtn.setAttribute("aria-pressed", "true");
    replace(playBtn, "Pause");
    playing = setInterval(() => {
      if (!current(gen)) return stop();
      const next = Number(scrub.value) + step;
      seek(next);
      if (next >= points.length - 1) stop();
    }, 50);
  });

  if (params.get("track")) {
    trackDevice.appendChild(h("option", { value: params.get("track") }, params.get("track")));
    trackDevice.value = params.get("track");
    showTrack().catch(showError);
  }
  await every(60000, load);
}

// The outer rings of the WKT polygons in a rule's inside() calls, as
// [[lon, lat], …].
function geofences(sql) {
  const out = [];
  for (const m of sql.matchAll(/inside\s*\([^']*'\s*POLYGON\s*\(\s*\(([^)]*)\)/gi)) {
    const ring = m[1].split(",").map((pair) => pair.trim().split(/\s+/).map(Number)).filter((p) => p.length === 2 && p.every(Number.isFinite));
    if (ring.length >= 3) out.push(ring);
  }
  return out;
}

// ---- Alarms --------------------------------------------------------------------

async function alarms(view, gen, parts, params) {
  const status = params.get("status") === "cleared" ? "cleared" : "active";
  const severity = params.get("severity") || "";
  const before = params.get("before") || "";
  const body = h("div", {}, "Loading…");
  const badge = liveBadge();
  replace(view, h("h1", {}, "Alarms ", badge),
    h("div", { class: "tabs" },
      h("a", { href: "#/alarms" + query({ status: "active", severity }), class: status === "active" ? "active" : null }, "Active"),
      h("a", { href: "#/alarms" + query({ status: "cleared", severity }), class: status === "cleared" ? "active" : null }, "History")),
    severity ? h("p", {}, "Severity ", h("span", { class: "badge sev-" + severity }, severity), " ", h("a", { href: "#/alarms" + query({ status }) }, "(all)")) : null,
    body);
  const load = async () => {
    const r = await get("/alarms" + query({ status, severity, before, limit: 50 }));
    if (!current(gen)) return;
    replace(body,
      alarmTable(r.items, status, load, status === "active" ? "No active alarms." : "No cleared alarms."),
      h("div", { class: "pager" },
        before ? h("a", { href: "#/alarms" + query({ status, severity }) }, "Newest") : null,
        r.next ? h("a", { href: "#/alarms" + query({ status, severity, before: r.next }) }, "Older") : null));
  };
  // Changes arrive live; a slow poll covers a missed event.
  let pending = null;
  const soon = () => { clearTimeout(pending); pending = setTimeout(() => { if (current(gen)) load().catch(showError); }, 200); };
  live("", { alarm: soon, lagged: soon }, badge);
  await every(30000, load);
}

// Alarms as a table with their acknowledge and clear buttons.
function alarmTable(items, status, reload, empty) {
  return table(["Id", "Raised", "Device", "Type", "Severity", "Acknowledged", status === "cleared" ? "Cleared" : "", ""],
    items.map((a) => h("tr", { "data-alarm": a.id },
      h("td", {}, a.id), h("td", {}, fmtTime(a.created_ms)),
      h("td", {}, h("a", { href: "#/devices/" + enc(a.device_id) }, a.device_id)),
      h("td", {}, a.type), h("td", {}, h("span", { class: "badge sev-" + a.severity }, a.severity)),
      h("td", { class: "acked" }, a.acked ? "by " + (a.acked_by || "?") + ", " + fmtTime(a.acked_ms) : "no"),
      h("td", {}, a.cleared_ms ? fmtTime(a.cleared_ms) + (a.cleared_by ? " (" + a.cleared_by + ")" : "") : ""),
      h("td", {},
        a.status === "active" && !a.acked ? writeButton("Acknowledge", async () => { await api("POST", "/alarms/" + a.id + "/ack"); await reload(); }) : null,
        " ",
        a.status === "active" ? writeButton("Clear", async () => { await api("POST", "/alarms/" + a.id + "/clear"); await reload(); }, "danger") : null))),
    empty);
}

// ---- Fleet-wide settings ---------------------------------------------------------

async function fleetSettings(view, gen) {
  const body = h("div", {}, "Loading…");
  const form = canWrite() ? settingForm() : null;
  replace(view, h("h1", {}, "Fleet-wide settings"),
    h("p", { class: "muted" }, "One desired value for every device a group, label or profile selects; each device is told and the bar fills as they report it back."),
    form, h("h2", {}, "Recent settings"), body);
  const load = async () => {
    const r = await get("/settings" + query({ limit: 50 }));
    if (!current(gen)) return;
    replace(body, table(["Set", "By", "Selector", "State", "Progress"], r.items.map((x) => {
      const p = x.progress;
      const bar = progressBar({ succeeded: p.reported, pending: p.pending, failed: p.failed });
      const sel = Object.entries(x.selector || {}).filter(([, v]) => v).map(([k, v]) => k + " " + v).join(", ") || "whole tenant";
      return h("tr", { "data-setting": x.id },
        h("td", {}, fmtTime(x.created_ms)), h("td", {}, x.created_by),
        h("td", {}, sel, x.shadow ? h("div", { class: "muted small" }, "shadow " + x.shadow) : null),
        h("td", {}, h("code", {}, JSON.stringify(x.state))),
        h("td", { class: "wide" }, h("div", { class: "reported" }, p.reported + " of " + p.targeted + " reported"), bar));
    }), "No fleet-wide settings yet."));
  };
  function settingForm() {
    const group = h("input", { name: "group", placeholder: "group" });
    const label = h("input", { name: "label", placeholder: "key=value" });
    const profile = h("input", { name: "profile", placeholder: "profile" });
    const shadow = h("input", { name: "shadow", placeholder: "(classic)" });
    const state = h("textarea", { name: "state", class: "code", rows: 2, placeholder: '{"setpoint": 18.5}' });
    const f = h("form", { class: "stack card settings-form" },
      h("label", {}, "Group", group), h("label", {}, "Label", label), h("label", {}, "Profile", profile),
      h("label", {}, "Named shadow", shadow), h("label", {}, "Desired state (JSON)", state),
      h("button", { class: "primary", type: "submit" }, "Set for every selected device"));
    f.addEventListener("submit", act(async (ev) => {
      ev.preventDefault();
      let parsed;
      try { parsed = JSON.parse(state.value); } catch (e) { throw new Error("the desired state is not JSON: " + e.message); }
      const b = { state: parsed };
      for (const [k, el] of [["group", group], ["label", label], ["profile", profile], ["shadow", shadow]]) if (el.value) b[k] = el.value;
      await api("POST", "/settings", b);
      state.value = "";
      await load();
    }));
    return f;
  }
  await every(2000, load);
}

// ---- Firmware (OTA) ------------------------------------------------------------

// Job states in the order a job goes through them, with their bar colours.
const JOB_STATES = [
  ["succeeded", "#1a7f37"], ["installing", "#2da44e"], ["verifying", "#4ac26b"],
  ["downloading", "#1f6feb"], ["notified", "#54aeff"], ["pending", "#b6c2cf"],
  ["queued", "#dde3ea"], ["failed", "#cf222e"], ["rejected", "#e16f24"],
  ["cancelled", "#8c959f"], ["expired", "#6e7781"],
];

// One bar split by job state, with a legend of the non-zero ones.
function progressBar(jobs) {
  const total = Object.values(jobs || {}).reduce((a, b) => a + b, 0) || 1;
  const bar = h("div", { class: "progress", title: Object.entries(jobs || {}).filter(([, n]) => n).map(([k, n]) => k + " " + n).join(", ") },
    JOB_STATES.filter(([k]) => jobs && jobs[k]).map(([k, c]) => {
      // Through the CSSOM: the console's CSP refuses style attributes.
      const seg = h("span", { class: "seg", "data-state": k });
      seg.style.width = (100 * jobs[k] / total) + "%";
      seg.style.background = c;
      return seg;
    }));
  const legend = h("div", { class: "muted small" }, JOB_STATES.filter(([k]) => jobs && jobs[k]).map(([k]) => k + " " + jobs[k]).join(" · ") || "no jobs");
  return h("div", {}, bar, legend);
}

async function upload(path, file) {
  const headers = { Accept: "application/json", "Content-Type": "application/octet-stream" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch("/api/v1" + path, { method: "POST", headers, body: file });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

async function firmware(view, gen) {
  const campaignsBox = h("div", {}, "Loading…");
  const artifactsBox = h("div", {}, "Loading…");
  const forms = h("div", { class: "cards two" });
  replace(view, h("h1", {}, "Firmware"), h("h2", {}, "Campaigns"), campaignsBox, h("h2", {}, "Images"), artifactsBox, forms);
  let artifacts = [];
  const load = async () => {
    const [c, a] = await Promise.all([get("/ota/campaigns"), get("/ota/artifacts")]);
    if (!current(gen)) return;
    artifacts = a.items;
    const names = Object.fromEntries(a.items.map((x) => [x.id, x.name + " " + x.version]));
    replace(campaignsBox, table(["Campaign", "Image", "Status", "Waves", "Progress", "Started"], c.items.map((x) => h("tr", {},
      h("td", {}, h("a", { href: "#/ota/" + enc(x.id) }, x.name)),
      h("td", {}, names[x.artifact] || x.artifact),
      h("td", {}, h("span", { class: "badge st-" + x.status }, x.status), x.reason ? h("div", { class: "muted small" }, x.reason) : null),
      h("td", {}, x.waves_started + " / " + x.waves),
      h("td", { class: "wide" }, progressBar(x.jobs)),
      h("td", {}, fmtTime(x.created_ms)))), "No campaigns yet."));
    replace(artifactsBox, table(["Image", "Version", "Size", "SHA-256", "Signed by", "Uploaded", ""], a.items.map((x) => h("tr", {},
      h("td", {}, x.name, x.hardware ? h("div", { class: "muted small" }, "hardware " + x.hardware) : null),
      h("td", {}, x.version), h("td", { class: "num" }, fmtBytes(x.size)),
      h("td", {}, h("code", { title: x.sha256 }, x.sha256.slice(0, 12) + "…")),
      h("td", {}, x.signed_by), h("td", {}, fmtTime(x.created_ms)),
      h("td", {}, writeButton("Delete", async () => {
        if (!confirm("Delete " + x.name + " " + x.version + "?")) return;
        await api("DELETE", "/ota/artifacts/" + enc(x.id)); await load();
      }, "danger")))), "No images yet."));
    if (canWrite()) renderForms();
  };
  let formsShown = false;
  const renderForms = () => {
    if (formsShown) {
      const sel = forms.querySelector("select[name=artifact]");
      if (sel && sel.options.length !== artifacts.length) replace(sel, artifacts.map((x) => h("option", { value: x.id }, x.name + " " + x.version)));
      return;
    }
    formsShown = true;
    const file = h("input", { type: "file", name: "file", required: true });
    const name = h("input", { name: "name", required: true, placeholder: "pump-fw" });
    const version = h("input", { name: "version", required: true, placeholder: "2.1.0" });
    const hardware = h("input", { name: "hardware", placeholder: "optional" });
    const up = h("form", { class: "stack card" }, h("h2", {}, "Upload an image"),
      h("label", {}, "File", file), h("label", {}, "Name", name), h("label", {}, "Version", version),
      h("label", {}, "Hardware revision", hardware),
      h("button", { class: "primary", type: "submit" }, "Upload and sign"));
    up.addEventListener("submit", act(async (ev) => {
      ev.preventDefault();
      if (!file.files[0]) return;
      await upload("/ota/artifacts" + query({ name: name.value, version: version.value, hardware: hardware.value }), file.files[0]);
      up.reset();
      await load();
    }));
    const artifact = h("select", { name: "artifact", required: true }, artifacts.map((x) => h("option", { value: x.id }, x.name + " " + x.version)));
    const group = h("input", { name: "group", placeholder: "group (optional)" });
    const label = h("input", { name: "label", placeholder: "key=value (optional)" });
    const devicesIn = h("input", { name: "devices", placeholder: "or devices: a,b,c" });
    const waves = h("input", { name: "waves", value: "10%,30%,100%" });
    const wait = h("input", { name: "wave_wait_s", type: "number", min: 0, value: 60 });
    const threshold = h("input", { name: "failure_threshold", type: "number", min: 0, max: 1, step: "0.05", value: 0.2 });
    const rate = h("input", { name: "rate", type: "number", min: 1, placeholder: "no limit" });
    const camp = h("form", { class: "stack card" }, h("h2", {}, "Start a campaign"),
      h("label", {}, "Image", artifact), h("label", {}, "Group", group), h("label", {}, "Label", label),
      h("label", {}, "Devices", devicesIn), h("label", {}, "Waves (counts or percentages)", waves),
      h("label", {}, "Seconds between waves, at least", wait), h("label", {}, "Abort when a wave's failures exceed", threshold),
      h("label", {}, "Devices started per minute, at most", rate),
      h("button", { class: "primary", type: "submit" }, "Start"));
    camp.addEventListener("submit", act(async (ev) => {
      ev.preventDefault();
      const body = {
        artifact: artifact.value,
        selector: { group: group.value || null, label: label.value || null },
        waves: waves.value.split(",").map((w) => w.trim()).filter(Boolean).map((w) => w.endsWith("%") ? { percent: Number(w.slice(0, -1)) } : { count: Number(w) }),
        wave_wait_s: Number(wait.value || 0),
        failure_threshold: Number(threshold.value),
      };
      const list = devicesIn.value.split(",").map((d) => d.trim()).filter(Boolean);
      if (list.length) body.devices = list;
      if (rate.value) body.max_starts_per_minute = Number(rate.value);
      const c = await api("POST", "/ota/campaigns", body);
      go("#/ota/" + enc(c.id));
    }));
    replace(forms, up, camp);
  };
  await every(3000, load);
}

function fmtBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}

async function campaign(view, gen, parts) {
  const id = parts[1];
  const body = h("div", {}, "Loading…");
  replace(view, h("p", {}, h("a", { href: "#/ota" }, "← Firmware")), body);
  const load = async () => {
    const c = await get("/ota/campaigns/" + enc(id));
    if (!current(gen)) return;
    const over = ["completed", "cancelled", "aborted"].includes(c.status);
    replace(body,
      h("h1", {}, c.name, " ", h("span", { class: "badge st-" + c.status }, c.status)),
      c.reason ? h("p", { class: c.status === "aborted" ? "error" : "muted" }, c.reason) : null,
      h("p", {}, "Image ", h("strong", {}, c.artifact.name + " " + c.artifact.version), " (" + fmtBytes(c.artifact.size || 0) + ") to ",
        c.targets + " devices; abort above " + Math.round(c.failure_threshold * 100) + " % failures per wave",
        c.max_starts_per_minute ? "; " + c.max_starts_per_minute + " starts per minute" : "",
        c.wave_wait_s ? "; " + c.wave_wait_s + " s between waves" : ""),
      h("div", { class: "toolbar" },
        c.status === "running" ? writeButton("Pause", async () => { await api("POST", "/ota/campaigns/" + enc(id) + "/pause"); await load(); }) : null,
        c.status === "paused" ? writeButton("Resume", async () => { await api("POST", "/ota/campaigns/" + enc(id) + "/resume"); await load(); }, "primary") : null,
        !over ? writeButton("Cancel", async () => {
          if (!confirm("Cancel this campaign? Devices not yet started will not be.")) return;
          await api("POST", "/ota/campaigns/" + enc(id) + "/cancel", { reason: "cancelled from the console" }); await load();
        }, "danger") : null),
      h("h2", {}, "All devices"), progressBar(c.jobs),
      h("h2", {}, "Waves"),
      table(["Wave", "Devices", "Started", "Progress"], c.waves.map((w, i) => h("tr", {},
        h("td", {}, String(i + 1)), h("td", { class: "num" }, String(w.size)),
        h("td", {}, w.started_ms ? fmtTime(w.started_ms) : h("span", { class: "muted" }, "waiting")),
        h("td", { class: "wide" }, progressBar(w.jobs)))), "No waves."),
      h("h2", {}, "Failures"),
      table(["Device", "Wave", "State", "Reason"], c.failures.map((f) => h("tr", {},
        h("td", {}, h("a", { href: "#/devices/" + enc(f.device) }, f.device)), h("td", {}, String(f.wave)),
        h("td", {}, f.state), h("td", {}, f.reason || ""))), "No failures."),
      c.skipped.length ? h("p", { class: "muted" }, c.skipped.length + " devices skipped (already in another campaign).") : null);
  };
  await every(2000, load);
}

// ---- Rules ---------------------------------------------------------------------

// ---- Scheduled reports -----------------------------------------------------------

const WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

function describeKind(k) {
  if (k.type === "energy") return "Energy (" + k.metric + ", " + (k.mode || "counter") + ")";
  return k.type === "availability" ? "Availability" : "Alarm summary";
}

function describeSchedule(sc) {
  const when = sc.every === "weekly" ? "weekly on " + WEEKDAYS[(sc.weekday || 1) - 1]
    : sc.every === "monthly" ? "monthly on day " + sc.day : "daily";
  return when + " at " + sc.at + " (" + sc.time_zone + ")";
}

function describeDelivery(d) {
  const out = [];
  if (d.email && d.email.length) out.push("mail to " + d.email.join(", "));
  if (d.webhook) out.push("webhook " + d.webhook.url);
  return out.join("; ") || "download only";
}

// A run's file: fetched with the token (a plain link would carry none) and
// saved through a blob URL.
async function downloadRun(reportId, run, ext) {
  const resp = await fetch("/api/v1/reports/" + enc(reportId) + "/runs/" + enc(run.id) + "/" + ext, {
    headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) },
  });
  if (!resp.ok) throw new ApiError(resp.status, { detail: "download failed: HTTP " + resp.status });
  const url = URL.createObjectURL(await resp.blob());
  const a = h("a", { href: url, download: reportId + "-" + run.id + "." + ext });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function reports(view, gen) {
  const body = h("div", {}, "Loading…");
  replace(view, h("h1", {}, "Reports"),
    h("p", { class: "muted" }, "Energy, availability and alarm summaries on a schedule, as CSV and HTML with charts: mailed, posted to a webhook and kept for download."),
    h("div", { class: "toolbar" }, canWrite() ? h("button", { type: "button", class: "primary", onclick: () => go("#/reports/new") }, "New report") : null),
    body);
  const load = async () => {
    const r = await get("/reports");
    if (!current(gen)) return;
    replace(body, table(["Report", "Kind", "Schedule", "Next run", "Delivery", ""], r.items.map((x) => h("tr", { "data-report": x.id },
      h("td", {}, h("a", { href: "#/reports/" + enc(x.id) }, x.name), h("div", { class: "muted small" }, x.id)),
      h("td", {}, describeKind(x.kind)),
      h("td", {}, describeSchedule(x.schedule)),
      h("td", {}, x.enabled && x.next_run_ms ? fmtTime(x.next_run_ms) : h("span", { class: "muted" }, "disabled")),
      h("td", { class: "small" }, describeDelivery(x.delivery)),
      h("td", {}, writeButton("Run now", async () => {
        await api("POST", "/reports/" + enc(x.id) + "/run");
        go("#/reports/" + enc(x.id));
      })))), "No reports yet."));
  };
  await every(10000, load);
}

async function reportPage(view, gen, parts) {
  const id = parts[1] === "new" ? null : parts[1];
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const r = id ? await get("/reports/" + enc(id)) : {
    name: "", kind: { type: "energy", metric: "energy_kwh", mode: "counter" }, devices: [],
    schedule: { every: "daily", at: "06:00", time_zone: zone }, delivery: { email: [] },
    retention: { keep_runs: 30, keep_days: 0 }, enabled: true,
  };
  if (!current(gen)) return;
  const f = {
    name: h("input", { name: "name", required: true, value: r.name }),
    type: h("select", { name: "type" }, ["energy", "availability", "alarms"].map((t) => h("option", { value: t }, t))),
    metric: h("input", { name: "metric", value: r.kind.metric || "" }),
    mode: h("select", { name: "mode" }, h("option", { value: "counter" }, "counter (increase)"), h("option", { value: "sum" }, "sum")),
    devices: h("input", { name: "devices", placeholder: "all devices", value: (r.devices || []).join(", ") }),
    every: h("select", { name: "every" }, ["daily", "weekly", "monthly"].map((t) => h("option", { value: t }, t))),
    at: h("input", { name: "at", type: "time", value: r.schedule.at }),
    weekday: h("select", { name: "weekday" }, WEEKDAYS.map((d, i) => h("option", { value: String(i + 1) }, d))),
    day: h("input", { name: "day", type: "number", min: 1, max: 31, value: r.schedule.day || 1 }),
    zone: h("input", { name: "time_zone", value: r.schedule.time_zone, placeholder: "Europe/Berlin, UTC or +05:30" }),
    email: h("input", { name: "email", placeholder: "ops@example.com, …", value: (r.delivery.email || []).join(", ") }),
    hook: h("input", { name: "webhook", placeholder: "where each run is posted", value: r.delivery.webhook ? r.delivery.webhook.url : "" }),
    secret: h("input", { name: "secret", type: "password", placeholder: r.delivery.webhook && r.delivery.webhook.secret_set ? "(unchanged)" : "optional" }),
    keepRuns: h("input", { name: "keep_runs", type: "number", min: 1, max: 1000, value: r.retention.keep_runs }),
    keepDays: h("input", { name: "keep_days", type: "number", min: 0, value: r.retention.keep_days || 0 }),
    enabled: h("input", { name: "enabled", type: "checkbox" }),
  };
  f.type.value = r.kind.type;
  f.mode.value = r.kind.mode || "counter";
  f.every.value = r.schedule.every;
  f.weekday.value = String(r.schedule.weekday || 1);
  f.enabled.checked = !!r.enabled;
  const energyOnly = h("div", { class: "stack" }, h("label", {}, "Metric", f.metric), h("label", {}, "Method", f.mode));
  const weekdayBox = h("label", {}, "Weekday", f.weekday);
  const dayBox = h("label", {}, "Day of the month (a shorter month runs on its last day)", f.day);
  // `display`, not `hidden`: the form's labels are flex boxes, which the
  // attribute's default style does not override.
  const show = (el, on) => { el.style.display = on ? "" : "none"; };
  const sync = () => {
    show(energyOnly, f.type.value === "energy");
    show(weekdayBox, f.every.value === "weekly");
    show(dayBox, f.every.value === "monthly");
  };
  f.type.addEventListener("change", sync);
  f.every.addEventListener("change", sync);
  sync();
  const readOnly = !canWrite();
  for (const el of Object.values(f)) el.disabled = readOnly;
  const list = (v) => v.split(",").map((x) => x.trim()).filter(Boolean);
  const form = h("form", { class: "stack card report-form" },
    h("label", {}, "Name", f.name), h("label", {}, "Kind", f.type), energyOnly,
    h("label", {}, "Devices (comma-separated)", f.devices),
    h("label", {}, "Every", f.every), weekdayBox, dayBox, h("label", {}, "At", f.at), h("label", {}, "Time zone", f.zone),
    h("label", {}, "Mail to", f.email), h("label", {}, "Webhook URL", f.hook), h("label", {}, "Webhook secret", f.secret),
    h("label", {}, "Runs kept", f.keepRuns), h("label", {}, "Days kept (0: no limit)", f.keepDays),
    h("label", {}, h("span", {}, f.enabled, " enabled")),
    readOnly ? null : h("div", { class: "toolbar" },
      h("button", { class: "primary", type: "submit" }, id ? "Save" : "Create"),
      id ? h("button", { type: "button", onclick: act(async () => { await api("POST", "/reports/" + enc(id) + "/run"); await loadRuns(); }) }, "Run now") : null,
      id ? h("button", { type: "button", class: "danger", onclick: act(async () => {
        if (!confirm("Delete report " + r.name + " and its runs?")) return;
        await api("DELETE", "/reports/" + enc(id));
        go("#/reports");
      }) }, "Delete") : null));
  form.addEventListener("submit", act(async (ev) => {
    ev.preventDefault();
    const kind = f.type.value === "energy" ? { type: "energy", metric: f.metric.value, mode: f.mode.value } : { type: f.type.value };
    const schedule = { every: f.every.value, at: f.at.value, time_zone: f.zone.value };
    if (f.every.value === "weekly") schedule.weekday = Number(f.weekday.value);
    if (f.every.value === "monthly") schedule.day = Number(f.day.value);
    const delivery = { email: list(f.email.value) };
    if (f.hook.value) {
      delivery.webhook = { url: f.hook.value };
      if (f.secret.value) delivery.webhook.secret = f.secret.value;
    }
    const body = {
      name: f.name.value, kind, devices: list(f.devices.value), schedule, delivery,
      retention: { keep_runs: Number(f.keepRuns.value), keep_days: Number(f.keepDays.value) }, enabled: f.enabled.checked,
    };
    const saved = id ? await api("PUT", "/reports/" + enc(id), body) : await api("POST", "/reports", body);
    go("#/reports/" + enc(saved.id));
  }));
  const runsBox = h("div", {}, id ? "Loading…" : "");
  const loadRuns = async () => {
    if (!id) return;
    const runs = await get("/reports/" + enc(id) + "/runs");
    if (!current(gen)) return;
    replace(runsBox, table(["Started", "Period", "Trigger", "Rows", "Deliveries", ""], runs.items.map((run) => h("tr", { "data-run": run.id },
      h("td", {}, fmtTime(run.started_ms)),
      h("td", {}, fmtTime(run.from_ms), " – ", fmtTime(run.to_ms)),
      h("td", {}, run.trigger),
      h("td", { class: "num" }, run.ok ? String(run.rows) : h("span", { class: "error" }, run.error || "failed")),
      h("td", { class: "small" }, run.deliveries.map((d) => h("div", {}, d.channel, ": ",
        d.ok ? "sent" + ((d.attempts || 1) > 1 ? " (attempt " + d.attempts + ")" : "") : h("span", { class: "error" }, d.error || "failed"),
        !d.ok && d.next_retry_ms ? h("span", { class: "muted" }, " · retry " + fmtTime(d.next_retry_ms)) : null,
        !d.ok && !d.next_retry_ms && (d.attempts || 1) > 1 ? h("span", { class: "muted" }, " · gave up after " + d.attempts + " attempts") : null))),
      h("td", {}, run.ok ? [
        h("button", { type: "button", onclick: act(() => downloadRun(id, run, "csv")) }, "CSV"), " ",
        h("button", { type: "button", onclick: act(() => downloadRun(id, run, "html")) }, "HTML"),
      ] : null))), "No runs yet."));
  };
  replace(view, h("h1", {}, id ? "Report " + r.name : "New report"),
    id ? h("p", { class: "muted" }, describeSchedule(r.schedule), r.next_run_ms && r.enabled ? "; next run " + fmtTime(r.next_run_ms) : "") : null,
    form, id ? h("h2", {}, "Runs") : null, runsBox);
  if (id) await every(10000, loadRuns);
}

// Rule counters as a table: totals since the engine loaded the rule, and
// per-second rates over the last poll (5 s).
const RULE_COUNTERS = [["received", "Received"], ["matched", "Matched"], ["fired", "Fired"], ["cleared", "Cleared"], ["failed", "Failed"], ["action_failures", "Action failures"]];

async function rules(view, gen) {
  const body = h("div", {}, "Loading…");
  replace(view, h("h1", {}, "Rules"),
    h("div", { class: "toolbar" }, canWrite() ? h("button", { type: "button", class: "primary", onclick: () => go("#/rules/new") }, "New rule") : null),
    body);
  let prev = null; // { t, counters by rule id }
  const load = async () => {
    const r = await get("/rules");
    if (!current(gen)) return;
    const t = performance.now();
    const dt = prev ? (t - prev.t) / 1000 : 0;
    const rate = (rule, k) => {
      const was = prev && prev.by[rule.id];
      if (!was || !rule.counters || dt <= 0) return null;
      return Math.max(0, (rule.counters[k] || 0) - (was[k] || 0)) / dt;
    };
    replace(body, table(["Rule", "Enabled", ...RULE_COUNTERS.map(([, l]) => h("th", { class: "num" }, l)), "Last error", ""], r.items.map((rule) => {
      const c = rule.counters;
      const lastError = c && (c.last_action_error || c.last_error);
      return h("tr", { "data-rule": rule.id },
        h("td", {}, h("a", { href: "#/rules/" + enc(rule.id) }, rule.name || rule.id), h("div", { class: "muted" }, rule.description || "")),
        h("td", {}, rule.enabled ? "yes" : "no"),
        RULE_COUNTERS.map(([k]) => {
          if (!c) return h("td", { class: "num muted" }, "—");
          const per = rate(rule, k);
          return h("td", { class: "num", "data-counter": k }, String(c[k] ?? 0),
            per === null ? null : h("div", { class: "muted small" }, fmtRate(per) + " /s"));
        }),
        h("td", { class: "small" }, lastError ? [fmtTime(lastError.ts_ms), ": ", lastError.error] : h("span", { class: "muted" }, "—")),
        h("td", {}, writeButton(rule.enabled ? "Disable" : "Enable", async () => {
          await api("POST", "/rules/" + enc(rule.id) + (rule.enabled ? "/disable" : "/enable"));
          await load();
        })));
    }), "No rules yet."));
    prev = { t, by: Object.fromEntries(r.items.map((x) => [x.id, x.counters || {}])) };
  };
  await every(5000, load);
}

const SQL_KEYWORDS = new Set(["select", "from", "where", "group", "by", "having", "for", "clear", "when",
  "and", "or", "not", "as", "is", "null", "in", "between", "like", "case", "then", "else", "end",
  "true", "false", "tumbling", "hopping", "sliding", "silence", "every", "limit", "order", "asc", "desc"]);

/// Spans for a rule's SQL: no HTML is built from the text (only text
/// nodes), so nothing typed can inject markup.
function highlightSql(text) {
  const out = [];
  const re = /(--[^\n]*)|('(?:[^']|'')*'?)|(\d+(?:\.\d+)?(?:[smhd]|ms)?\b)|([A-Za-z_][A-Za-z0-9_.]*)|(\s+|[^\sA-Za-z0-9_'-]+|-)/g;
  let m;
  while ((m = re.exec(text)) !== null) {
    const [tok, comment, str, num, word] = m;
    if (comment) out.push(h("span", { class: "sql-comment" }, tok));
    else if (str) out.push(h("span", { class: "sql-string" }, tok));
    else if (num) out.push(h("span", { class: "sql-number" }, tok));
    else if (word && SQL_KEYWORDS.has(word.toLowerCase())) out.push(h("span", { class: "sql-kw" }, tok));
    else if (word && text[re.lastIndex] === "(") out.push(h("span", { class: "sql-fn" }, tok));
    else out.push(document.createTextNode(tok));
  }
  return out;
}

async function ruleForm(view, gen, parts, params) {
  const id = parts[1] === "new" ? null : parts[1];
  // A new rule may come prefilled (the map's "Make a rule" of a drawn
  // geofence): name and SQL from the address.
  const rule = id ? await get("/rules/" + enc(id)) : {
    name: (params && params.get("name")) || "", description: "", sql: (params && params.get("sql")) || "",
    actions: (params && params.get("sql")) ? [{ type: "alarm", alarm_type: "geofence_exit", severity: "major" }] : [],
    enabled: true,
  };
  if (!current(gen)) return;
  const name = h("input", { value: rule.name || "" });
  const description = h("input", { value: rule.description || "" });
  const sql = h("textarea", { class: "code", rows: 8, spellcheck: "false", value: rule.sql || "" });
  const sqlError = h("div", {});
  // The SQL again, highlighted as it is typed: keywords, functions,
  // topics and strings, numbers, comments.
  const shown = h("pre", { class: "sql", "aria-hidden": "true" });
  const paint = () => replace(shown, highlightSql(sql.value));
  sql.addEventListener("input", paint);
  paint();
  const actions = h("textarea", { class: "code", rows: 8, spellcheck: "false", value: JSON.stringify(rule.actions || [], null, 2) });
  const actionsError = h("div", {});
  const enabled = h("input", { type: "checkbox" });
  enabled.checked = !!rule.enabled;
  const readOnly = !canWrite();
  for (const el of [name, description, sql, actions, enabled]) el.disabled = readOnly;
  const form = h("form", { class: "stack" },
    h("label", {}, "Name", name),
    h("label", {}, "Description", description),
    h("label", {}, "SQL", sql), shown, sqlError,
    h("label", {}, "Actions (JSON array)", actions), actionsError,
    h("label", {}, h("span", {}, enabled, " enabled")),
    readOnly ? null : h("div", { class: "toolbar" },
      h("button", { class: "primary", type: "submit" }, id ? "Save" : "Create"),
      id ? h("button", { type: "button", class: "danger", onclick: act(async () => {
        if (!confirm("Delete rule " + (rule.name || id) + "?")) return;
        await api("DELETE", "/rules/" + enc(id));
        go("#/rules");
      }) }, "Delete") : null));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const acts = ruleActions(actions, sqlError, actionsError);
    if (!acts) return;
    const body = { name: name.value, description: description.value, sql: sql.value, actions: acts, enabled: enabled.checked };
    try {
      const saved = id ? await api("PUT", "/rules/" + enc(id), body) : await api("POST", "/rules", body);
      go("#/rules/" + enc(saved.id));
    } catch (e) {
      if (e instanceof ApiError && e.status === 422) showRuleProblem(e.problem, sql, sqlError, actionsError);
      else showError(e);
    }
  });
  replace(view, h("h1", {}, id ? "Rule " + (rule.name || id) : "New rule"), form,
    readOnly ? null : backtestPanel(id, sql, actions, sqlError, actionsError, gen));
}

// ---- Rule backtest ----------------------------------------------------------------

const BACKTEST_RANGES = [["1h", 3600e3], ["6h", 6 * 3600e3], ["24h", 86400e3], ["7d", 7 * 86400e3], ["30d", 30 * 86400e3]];

// "Backtest": the rule as written in the form (saved or not) replayed over
// the stored telemetry of a range (`POST /rules/backtest`): the totals, a
// chart of the rule's metric on one device with a mark where it fired and
// cleared, and a table of every output with what its actions would have
// done. Nothing is executed.
function backtestPanel(id, sql, actions, sqlError, actionsError, gen) {
  const range = h("select", { name: "backtest-range", "aria-label": "Backtest range" },
    BACKTEST_RANGES.map(([k]) => h("option", { value: k }, "last " + k)), h("option", { value: "custom" }, "custom…"));
  range.value = "24h";
  const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60e3).toISOString().slice(0, 16);
  const from = h("input", { type: "datetime-local", name: "backtest-from", value: local(Date.now() - 86400e3) });
  const to = h("input", { type: "datetime-local", name: "backtest-to", value: local(Date.now()) });
  const custom = h("span", { class: "custom-range" }, " from ", from, " to ", to);
  custom.hidden = true;
  range.addEventListener("change", () => { custom.hidden = range.value !== "custom"; });
  const devices = h("input", { name: "backtest-devices", placeholder: "all devices (or ids, comma-separated)", size: 32 });
  const result = h("div", { class: "backtest-result" });
  let chart = null;
  onLeave(() => { if (chart) chart.destroy(); });
  const run = act(async () => {
    const acts = ruleActions(actions, sqlError, actionsError);
    if (!acts) return;
    let span;
    if (range.value === "custom") span = [new Date(from.value).getTime(), new Date(to.value).getTime()];
    else { const now = Date.now(); span = [now - BACKTEST_RANGES.find(([k]) => k === range.value)[1], now]; }
    if (!(span[0] < span[1])) throw new Error("The range must start before it ends.");
    const body = { sql: sql.value, actions: acts, from: Math.floor(span[0]), to: Math.ceil(span[1]) };
    if (id) body.rule_id = id;
    const ids = devices.value.split(",").map((d) => d.trim()).filter(Boolean);
    if (ids.length) body.devices = ids;
    replace(result, h("p", { class: "muted" }, "Replaying…"));
    let r;
    try { r = await api("POST", "/rules/backtest", body); } catch (e) {
      replace(result);
      if (e instanceof ApiError && e.status === 422 && (e.problem.line || e.problem.type === "invalid-rule" || /invalid-rule/.test(e.problem.type || ""))) showRuleProblem(e.problem, sql, sqlError, actionsError);
      else if (e instanceof ApiError && (e.status === 413 || e.status === 422)) replace(result, h("p", { class: "error" }, e.message));
      else throw e;
      return;
    }
    if (!current(gen)) return;
    if (chart) { chart.destroy(); chart = null; }
    const chartBox = h("div", { class: "chart-box", "data-chart": "backtest" });
    const pick = h("select", { name: "backtest-device", "aria-label": "Device on the chart" });
    const firedDevices = [...new Set(r.firings.map((f) => f.device).filter(Boolean))];
    for (const d of firedDevices) pick.append(h("option", { value: d }, d));
    replace(result,
      h("p", { class: "backtest-summary" },
        `${r.messages} messages from ${r.devices} devices (${r.points} points): `,
        h("strong", {}, `fired ${r.fired}`), `, repeated ${r.repeated}, cleared ${r.cleared}`,
        r.failed ? `, failed ${r.failed}` : "", ` — ${r.elapsed_ms} ms`),
      r.last_error ? h("p", { class: "error" }, "Last error: " + r.last_error) : null,
      firedDevices.length ? h("div", { class: "toolbar" }, h("label", {}, "Chart of ", pick)) : null,
      firedDevices.length ? chartBox : null,
      table(["Time", "Event", "Device", "Row", "Actions"], r.firings.slice(0, 500).map((f) => h("tr", { "data-event": f.event },
        h("td", {}, fmtTime(f.ts_ms)), h("td", {}, h("span", { class: "event-" + f.event }, f.event)),
        h("td", {}, f.device || "—"), h("td", {}, h("code", {}, json(f.row))),
        h("td", {}, f.actions.map((a) => h("div", {}, a.summary))))), "The rule would not have fired in this range."),
      r.firings.length > 500 || r.truncated ? h("p", { class: "muted small" }, `Only the first ${Math.min(500, r.firings.length)} of ${r.fired + r.repeated + r.cleared} outputs are listed.`) : null);
    const draw = async () => {
      const device = pick.value;
      if (!device) return;
      const mine = r.firings.filter((f) => f.device === device);
      const metric = await chartMetric(device, mine, sql.value);
      if (!current(gen)) return;
      if (chart) { chart.destroy(); chart = null; }
      chartBox.replaceChildren();
      if (!metric) { replace(chartBox, h("p", { class: "muted" }, "No stored metric of this device in the rule's rows.")); return; }
      const want = (r.to_ms - r.from_ms) / 400;
      const b = BUCKETS.find(([, ms]) => ms >= want) || BUCKETS[BUCKETS.length - 1];
      const a = await get("/telemetry/aggregate" + query({ metric, device, from: r.from_ms, to: r.to_ms, bucket: b[0], fn: "avg" }));
      if (!current(gen)) return;
      const buckets = (((a.series || [])[0] || {}).buckets || []).filter((x) => typeof x.avg === "number");
      const half = (a.bucket_ms || 0) / 2;
      const line = [buckets.map((x) => x.ts_ms + half), buckets.map((x) => x.avg)];
      // A mark at the output's value of the metric, else on the line.
      const at = (f) => {
        const v = f.row && f.row[metric];
        if (typeof v === "number") return v;
        let best = null;
        line[0].forEach((x, i) => { if (best === null || Math.abs(x - f.ts_ms) < Math.abs(line[0][best] - f.ts_ms)) best = i; });
        return best === null ? null : line[1][best];
      };
      const marks = (ev) => { const fs = mine.filter((f) => f.event === ev); return [fs.map((f) => f.ts_ms), fs.map(at)]; };
      const fires = marks("fire"), clears = marks("clear");
      chartBox.dataset.metric = metric;
      chartBox.dataset.fires = String(fires[0].length);
      chartBox.dataset.clears = String(clears[0].length);
      chart = timeChart(chartBox, [
        { name: metric },
        { name: "fired", marks: true, scaleOf: metric, color: "--bad" },
        { name: "cleared", marks: true, scaleOf: metric, color: "--ok" },
      ], align([line, fires, clears]), { span: [r.from_ms, r.to_ms] });
    };
    pick.addEventListener("change", () => draw().catch(showError));
    await draw();
  });
  return h("section", { class: "backtest" },
    h("h2", {}, "Backtest"),
    h("p", { class: "muted small" }, "What the rule as written above would have done over the stored telemetry of a range: every fire, repeat and clear, with the actions it would have run. Nothing is executed; timers run on the readings' own clock."),
    h("div", { class: "toolbar" }, range, custom, devices,
      h("button", { type: "button", class: "primary", name: "backtest", onclick: run }, "Backtest")),
    result);
}

// The metric a backtest chart draws for a device: the first column of the
// rule's rows the device stores, else the first of its metrics the SQL
// names.
async function chartMetric(device, firings, sqlText) {
  const r = await get("/devices/" + enc(device) + "/series");
  const stored = (r.items || r.series || []).map((x) => (typeof x === "string" ? x : x.metric)).filter(Boolean);
  for (const f of firings) for (const [k, v] of Object.entries(f.row || {})) if (typeof v === "number" && stored.includes(k)) return k;
  return stored.find((m) => new RegExp("\\b" + m.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "\\b").test(sqlText)) || null;
}

// The rule form's actions, parsed, with the errors of an earlier try
// cleared; `null` (and the reason under the actions) when not JSON.
function ruleActions(actions, sqlError, actionsError) {
  replace(sqlError);
  replace(actionsError);
  try { return JSON.parse(actions.value || "[]"); } catch (e) {
    replace(actionsError, h("p", { class: "error" }, "Not JSON: " + e.message));
    return null;
  }
}

// A rule the service refused: the message under the SQL, the faulty line
// with a caret under the column, and the position selected in the textarea.
function showRuleProblem(problem, sql, sqlError, actionsError) {
  const message = problem.detail || problem.title || "invalid rule";
  if (!problem.line) {
    replace(/action/i.test(message) ? actionsError : sqlError, h("p", { class: "error" }, message));
    return;
  }
  const lines = sql.value.split("\n");
  const line = Math.min(problem.line, lines.length);
  const col = Math.max(1, problem.column || 1);
  const text = lines[line - 1] || "";
  replace(sqlError, h("div", { class: "caret" },
    h("div", {}, "Line " + line + ", column " + col + ": " + message),
    h("pre", {}, text + "\n" + " ".repeat(col - 1) + "^")));
  let offset = 0;
  for (let i = 0; i < line - 1; i++) offset += lines[i].length + 1;
  const start = offset + Math.min(col - 1, text.length);
  const word = /^\w+/.exec(text.slice(col - 1));
  sql.focus();
  sql.setSelectionRange(start, start + Math.max(1, word ? word[0].length : 1));
}

// ---- Dashboards --------------------------------------------------------------------
//
// A dashboard is a saved list of widgets (`layout.widgets`), drawn in order
// on a grid of four columns (each widget 1–4 wide). The data comes in one
// request, `GET /dashboards/{id}/data` (or `/shared/{token}` for a share
// link), resolved by the server within the dashboard's tenant; the page
// redraws it every 15 s. Operators switch to editing: add a widget, move it,
// widen or narrow it, remove it, then save the layout.

const WIDGETS = {
  value: { label: "Value", fields: ["device", "metric"] },
  gauge: { label: "Gauge", fields: ["device", "metric", "min", "max"] },
  chart: { label: "Chart", fields: ["device", "metric", "range"] },
  map: { label: "Map", fields: ["group"] },
  alarms: { label: "Alarm list", fields: ["device"] },
  devices: { label: "Device table", fields: ["group", "metrics"] },
  group: { label: "Group aggregate", fields: ["group", "metric", "fn", "range"] },
};

async function dashboards(view, gen) {
  const body = h("div", {}, "Loading…");
  const name = h("input", { name: "dashboard-name", placeholder: "Name", required: true });
  const create = h("form", { class: "toolbar" }, name, h("button", { type: "submit", class: "primary" }, "New dashboard"));
  create.addEventListener("submit", act(async (ev) => {
    ev.preventDefault();
    const d = await api("POST", "/dashboards", { name: name.value, layout: { widgets: [] } });
    go("#/dashboards/" + enc(d.id) + "?edit=1");
  }));
  replace(view, h("h1", {}, "Dashboards"), canWrite() ? create : null, body);
  const r = await get("/dashboards");
  if (!current(gen)) return;
  replace(body, table(["Name", "Tenant", "Default of profile", "Widgets", "Updated"], r.items.map((d) => h("tr", { "data-dashboard": d.id },
    h("td", {}, h("a", { href: "#/dashboards/" + enc(d.id) }, d.name), h("div", { class: "muted" }, d.description || "")),
    h("td", {}, d.tenant), h("td", {}, d.profile || "—"),
    h("td", { class: "num" }, ((d.layout || {}).widgets || []).length),
    h("td", {}, fmtTime(d.updated_ms) + " by " + d.updated_by))), "No dashboards yet."));
}

async function dashboard(view, gen, parts, params) {
  const id = parts[1];
  const forDevice = params.get("device") || "";
  let d = await get("/dashboards/" + enc(id));
  if (!current(gen)) return;
  let editing = canWrite() && params.get("edit") === "1";
  let widgets = ((d.layout || {}).widgets || []).slice();
  let dirty = false;
  const title = h("h1", {}, d.name, forDevice ? h("span", { class: "muted" }, " · ", forDevice) : null);
  const tools = h("div", { class: "toolbar" });
  const editor = h("div", {});
  const grid = h("div", { class: "dash-grid", "data-dashboard": id });
  const sharing = h("div", {});
  replace(view, title, tools, editor, grid, sharing);
  let data = null;
  const charts = [];
  onLeave(() => charts.splice(0).forEach((c) => c.destroy()));
  const load = async () => {
    if (dirty) return; // an unsaved layout is drawn from what was read
    const r = await get("/dashboards/" + enc(id) + "/data" + query({ device: forDevice }));
    if (!current(gen)) return;
    data = r.data;
    draw();
  };
  const draw = () => {
    drawDashboard(grid, widgets, data, charts, editing ? {
      move(i, by) { const j = i + by; if (j < 0 || j >= widgets.length) return; [widgets[i], widgets[j]] = [widgets[j], widgets[i]]; if (data) [data[i], data[j]] = [data[j], data[i]]; changed(); },
      widen(i, by) { const w = Math.min(4, Math.max(1, (widgets[i].width || 1) + by)); widgets[i] = { ...widgets[i], width: w }; changed(); },
      remove(i) { widgets.splice(i, 1); if (data) data.splice(i, 1); changed(); },
    } : null);
  };
  const changed = () => { dirty = true; renderTools(); draw(); };
  const renderSaveButton = () => {
    const b = tools.querySelector("button[name=save]");
    if (b) { b.disabled = !dirty; b.textContent = dirty ? "Save" : "Saved"; }
  };
  // The device profile this dashboard is the default of ("" for none).
  const profile = h("input", { name: "dashboard-profile", placeholder: "default of profile…", value: d.profile || "", size: 18,
    title: "Opened from a device of this profile, widgets that name no device show that device" });
  profile.addEventListener("input", () => { dirty = true; renderSaveButton(); });
  const save = act(async () => {
    d = await api("PUT", "/dashboards/" + enc(id), { name: d.name, profile: profile.value.trim() || null, layout: { ...(d.layout || {}), widgets } });
    dirty = false;
    renderTools();
    await load();
  });
  const renderTools = () => {
    if (!canWrite()) { replace(tools); return; }
    replace(tools,
      h("button", { type: "button", name: "edit", "aria-pressed": String(editing), onclick: () => { editing = !editing; renderTools(); draw(); } }, editing ? "Done editing" : "Edit"),
      editing ? h("button", { type: "button", name: "save", class: "primary", disabled: !dirty, onclick: save }, dirty ? "Save" : "Saved") : null,
      editing ? profile : null,
      editing ? writeButton("Delete dashboard", async () => {
        if (!confirm("Delete dashboard " + d.name + "? Its share links stop working.")) return;
        await api("DELETE", "/dashboards/" + enc(id));
        go("#/dashboards");
      }, "danger") : null);
    replace(editor, editing ? widgetForm((w) => {
      widgets.push(w);
      if (data) data.push({ pending: true });
      changed();
    }, d) : null);
    if (editing) renderSharing(); else replace(sharing);
  };
  const renderSharing = async () => {
    const r = await get("/dashboards/" + enc(id) + "/shares");
    if (!current(gen) || !editing) return;
    const expiry = h("select", { name: "share-expiry", "aria-label": "Link expires after" },
      ["1h", "24h", "7d", "30d"].map((x) => h("option", { value: x }, x)));
    expiry.value = "7d";
    const made = h("div", {});
    replace(sharing, h("h2", {}, "Share read-only"),
      h("p", { class: "muted small" }, "Anyone with the link sees this dashboard, read-only, without logging in, until it expires or is revoked."),
      h("div", { class: "toolbar" }, "Expires after ", expiry, writeButton("Create link", async () => {
        const s = await api("POST", "/dashboards/" + enc(id) + "/shares", { expires_in: expiry.value });
        const url = location.origin + s.console_path;
        await renderSharing();
        replace(sharing.querySelector(".share-made"), h("div", { class: "secret" }, "Link (shown once): ", h("a", { href: url, class: "share-link" }, url)));
      })),
      h("div", { class: "share-made" }, made),
      table(["Created", "By", "Expires", "State", ""], r.items.map((x) => h("tr", { "data-share": x.id },
        h("td", {}, fmtTime(x.created_ms)), h("td", {}, x.created_by), h("td", {}, fmtTime(x.expires_ms)),
        h("td", {}, x.revoked_ms ? "revoked" : x.live ? "live" : "expired"),
        h("td", {}, x.live ? writeButton("Revoke", async () => {
          await api("DELETE", "/dashboards/" + enc(id) + "/shares/" + enc(x.id));
          await renderSharing();
        }) : null))), "No links."));
  };
  renderTools();
  draw();
  await every(15000, load);
}

// The form that adds a widget: its type, a title and the fields it reads.
function widgetForm(add, d) {
  const type = h("select", { name: "widget-type", "aria-label": "Widget type" }, Object.entries(WIDGETS).map(([k, v]) => h("option", { value: k }, v.label)));
  const inputs = {
    title: h("input", { name: "widget-title", placeholder: "Title" }),
    device: h("input", { name: "widget-device", placeholder: d.profile ? "device (empty: the device opened)" : "device" }),
    metric: h("input", { name: "widget-metric", placeholder: "metric" }),
    group: h("input", { name: "widget-group", placeholder: "group (empty: all)" }),
    metrics: h("input", { name: "widget-metrics", placeholder: "metrics, comma-separated" }),
    range: h("select", { name: "widget-range", "aria-label": "Range" }, ["1h", "6h", "24h", "7d", "30d"].map((x) => h("option", { value: x }, x))),
    fn: h("select", { name: "widget-fn", "aria-label": "Aggregate" }, ["avg", "min", "max", "sum", "count"].map((x) => h("option", { value: x }, x))),
    min: h("input", { name: "widget-min", type: "number", placeholder: "min", value: "0" }),
    max: h("input", { name: "widget-max", type: "number", placeholder: "max", value: "100" }),
  };
  const fields = h("span", { class: "widget-fields" });
  const show = () => replace(fields, inputs.title, WIDGETS[type.value].fields.map((f) => inputs[f]));
  type.addEventListener("change", show);
  show();
  const form = h("form", { class: "toolbar widget-form" }, "Add ", type, fields, h("button", { type: "submit", name: "add-widget" }, "Add widget"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const w = { type: type.value, width: type.value === "chart" || type.value === "map" || type.value === "devices" ? 2 : 1 };
    if (inputs.title.value) w.title = inputs.title.value;
    for (const f of WIDGETS[type.value].fields) {
      const v = inputs[f].value.trim();
      if (!v) continue;
      if (f === "min" || f === "max") w[f] = Number(v);
      else if (f === "metrics") w[f] = v.split(",").map((x) => x.trim()).filter(Boolean);
      else w[f] = v;
    }
    add(w);
    inputs.title.value = "";
  });
  return form;
}

// Draw every widget into `grid`. `edit`: the controls of the editor
// (move, widen, remove), absent read-only.
function drawDashboard(grid, widgets, data, charts, edit) {
  charts.splice(0).forEach((c) => c.destroy());
  grid.replaceChildren();
  if (!widgets.length) grid.append(h("p", { class: "muted" }, edit ? "No widgets yet: add one above." : "This dashboard has no widgets."));
  widgets.forEach((w, i) => {
    const body = h("div", { class: "widget-body" });
    const controls = edit ? h("span", { class: "widget-controls" },
      h("button", { type: "button", title: "Move earlier", "aria-label": "Move earlier", onclick: () => edit.move(i, -1) }, "◀"),
      h("button", { type: "button", title: "Move later", "aria-label": "Move later", onclick: () => edit.move(i, 1) }, "▶"),
      h("button", { type: "button", title: "Narrower", "aria-label": "Narrower", onclick: () => edit.widen(i, -1) }, "−"),
      h("button", { type: "button", title: "Wider", "aria-label": "Wider", onclick: () => edit.widen(i, 1) }, "+"),
      h("button", { type: "button", class: "danger", title: "Remove", "aria-label": "Remove", name: "remove-widget", onclick: () => edit.remove(i) }, "×")) : null;
    const card = h("section", { class: "card widget w" + Math.min(4, Math.max(1, w.width || 1)), "data-widget": w.type },
      h("div", { class: "widget-head" }, h("strong", {}, w.title || widgetTitle(w)), controls), body);
    grid.append(card);
    const v = data && data[i];
    if (!v || v.pending) { replace(body, h("p", { class: "muted" }, v && v.pending ? "Save to see its data." : "Loading…")); return; }
    if (v.error) { replace(body, h("p", { class: "error" }, v.error)); return; }
    try { drawWidget(body, w, v, charts); } catch (e) { replace(body, h("p", { class: "error" }, String(e.message || e))); }
  });
}

function widgetTitle(w) {
  const what = [w.device, w.metric, w.group].filter(Boolean).join(" · ");
  return WIDGETS[w.type] ? WIDGETS[w.type].label + (what ? ": " + what : "") : w.type;
}

function drawWidget(body, w, v, charts) {
  switch (w.type) {
    case "value":
      replace(body, h("div", { class: "figure", "data-value": String(v.value) }, v.value === null ? "—" : fmtValue(v.value)),
        h("div", { class: "muted small" }, v.ts_ms ? ago(v.ts_ms) : "no data"));
      break;
    case "gauge": {
      const min = Number(w.min ?? 0), max = Number(w.max ?? 100);
      const frac = typeof v.value === "number" && max > min ? Math.min(1, Math.max(0, (v.value - min) / (max - min))) : 0;
      // A half circle from the left (min) to the right (max).
      const a = Math.PI * (1 - frac);
      const x = 60 + 50 * Math.cos(a), y = 60 - 50 * Math.sin(a);
      replace(body, s("svg", { viewBox: "0 0 120 70", class: "gauge", role: "img", "aria-label": `${v.value} of ${min}–${max}` },
        s("path", { d: "M10 60 A50 50 0 0 1 110 60", class: "gauge-track" }),
        frac > 0 ? s("path", { d: `M10 60 A50 50 0 0 1 ${x.toFixed(2)} ${y.toFixed(2)}`, class: "gauge-fill" }) : null),
      h("div", { class: "figure", "data-value": String(v.value) }, v.value === null ? "—" : fmtValue(v.value)),
      h("div", { class: "muted small" }, `${min} – ${max}` + (v.ts_ms ? " · " + ago(v.ts_ms) : "")));
      break;
    }
    case "chart": {
      const box = h("div", { class: "chart-box", "data-chart": "widget", "data-points": String(v.points.length) });
      replace(body, box);
      const p = v.points;
      const c = timeChart(box, [{ name: v.metric, band: true }], [p.map((x) => x[0]), p.map((x) => x[1]), p.map((x) => x[2]), p.map((x) => x[3])], { height: 180, span: [v.from_ms, v.to_ms] });
      charts.push(c);
      break;
    }
    case "map": {
      const box = h("div", { class: "widget-map", "data-devices": String(v.items.length) });
      replace(body, box, h("div", { class: "muted small" }, v.items.length + " devices with a position"));
      // Leaflet needs the box in the document, which it now is.
      (async () => {
        const config = sessionStorage.getItem(TOKEN_KEY) ? await consoleConfig().catch(() => null) : null;
        const lm = await createMap(box, config);
        const fleet = fleetLayer(lm, (id) => { if (sessionStorage.getItem(TOKEN_KEY)) go("#/devices/" + enc(id)); });
        fleet.update(v.items);
        fleet.flush();
        const b = fleet.bounds();
        if (b.isValid()) lm.fitBounds(b, { padding: [20, 20], maxZoom: 10 });
        charts.push({ destroy: () => lm.remove() });
      })().catch(showError);
      break;
    }
    case "alarms":
      replace(body, table(["Severity", "Device", "Type", "Since"], v.items.map((a) => h("tr", {},
        h("td", {}, h("span", { class: "sev sev-" + a.severity }, a.severity)), h("td", {}, a.device), h("td", {}, a.type),
        h("td", {}, ago(a.created_ms)))), "No active alarms."));
      break;
    case "devices":
      replace(body, table(["Device", "Online", ...v.metrics.map((m) => h("th", { class: "num" }, m))], v.items.map((d) => h("tr", {},
        h("td", {}, d.name || d.id), h("td", {}, d.online ? "yes" : "no"),
        ...v.metrics.map((m) => h("td", { class: "num" }, d.values[m] === null || d.values[m] === undefined ? "—" : fmtValue(d.values[m]))))), "No devices."));
      break;
    case "group":
      replace(body, h("div", { class: "figure", "data-value": String(v.value) }, v.value === null ? "—" : fmtValue(v.value)),
        h("div", { class: "muted small" }, `${v.fn} of ${v.metric} over ${v.reporting ?? 0} of ${v.devices} devices, last ${fmtDuration(Math.round((v.range_ms || 0) / 1000))}`));
      break;
    default:
      replace(body, h("p", { class: "muted" }, "Unknown widget " + w.type));
  }
}

// A shared dashboard: no login, no navigation, no control; the token in
// the link is the only credential, sent in the path of its one request.
async function sharedDashboard(token) {
  stopPage();
  $("bar").hidden = true;
  const gen = state.gen;
  const view = $("view");
  const grid = h("div", { class: "dash-grid read-only" });
  const title = h("h1", {}, "Shared dashboard");
  const note = h("p", { class: "muted small shared-note" });
  replace(view, title, note, grid);
  const charts = [];
  onLeave(() => charts.splice(0).forEach((c) => c.destroy()));
  const load = async () => {
    const resp = await fetch("/api/v1/shared/" + enc(token), { headers: { Accept: "application/json" } });
    if (!current(gen)) return;
    if (!resp.ok) {
      charts.splice(0).forEach((c) => c.destroy());
      replace(view, h("h1", {}, "This link no longer works"), h("p", { class: "muted" }, "It was revoked or has expired. Ask for a new one."));
      stopPage();
      return;
    }
    const r = await resp.json();
    replace(title, r.dashboard.name);
    replace(note, "Read-only shared view · updated " + fmtTime(r.ts_ms) + " · link expires " + fmtTime(r.expires_ms));
    drawDashboard(grid, r.dashboard.layout.widgets || [], r.data, charts, null);
  };
  await every(30000, load);
}

// ---- Audit and security events ---------------------------------------------------

async function audit(view, gen, parts, params) {
  const after = params.get("after") || "";
  const verify = h("span", {});
  const body = h("div", {}, "Loading…");
  replace(view, h("h1", {}, "Audit log"),
    h("div", { class: "toolbar" },
      h("button", { type: "button", onclick: act(async () => {
        const r = await get("/audit/verify");
        replace(verify, h("code", {}, json(r)));
      }) }, "Verify hash chain"), verify),
    body);
  const r = await get("/audit" + query({ after, limit: 100 }));
  if (!current(gen)) return;
  replace(body,
    table(["#", "Time", "Actor", "Action", "Target", "Outcome", "Detail"], r.items.map((a) => h("tr", {},
      h("td", {}, a.seq), h("td", {}, fmtTime(a.ts_ms)), h("td", {}, a.actor), h("td", {}, a.action),
      h("td", {}, a.target), h("td", {}, a.outcome), h("td", {}, h("code", {}, json(a.detail))))), "No records."),
    h("div", { class: "pager" },
      after ? h("a", { href: "#/audit" }, "First page") : null,
      r.next ? h("a", { href: "#/audit?after=" + r.next }, "Next page") : null));
}

// The nodes of a cluster as any node sees them (GET /cluster), every 2 s.
async function cluster(view, gen) {
  const nodesBox = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const countersBox = h("div", {});
  replace(view, h("h1", {}, "Cluster"), nodesBox, countersBox);
  await every(2000, async () => {
    const c = await get("/cluster");
    if (!current(gen)) return;
    if (!c.enabled) {
      replace(nodesBox, h("p", {}, "This node runs alone: start nodes with ", h("code", {}, "--cluster"),
        " and a NATS server to make them one platform (README: A cluster of nodes)."));
      replace(countersBox);
      return;
    }
    const num = (v) => h("td", { class: "num" }, String(v));
    replace(nodesBox,
      h("p", {}, "This console is served by ", h("strong", {}, c.node_id), "; ", String(c.nodes.length),
        c.nodes.length === 1 ? " node is" : " nodes are", " alive."),
      table(["Node", "MQTT", "Connections", "Sessions", "Subscriptions", "Retained", "Sent to others", "Received", "Seen"],
        c.nodes.map((n) => h("tr", {},
          h("td", {}, n.node_id === c.node_id ? h("strong", {}, n.node_id + " (this one)") : n.node_id),
          h("td", {}, n.mqtt), num(n.connections), num(n.sessions), num(n.subscriptions), num(n.retained),
          num(n.forwarded), num(n.received), h("td", {}, ago(n.updated_ms)))),
        "No node has reported in the last ten seconds."));
    replace(countersBox, h("h2", {}, "This node's fabric"),
      table(["Counter", "Value"], Object.entries(c.counters).map(([k, v]) =>
        h("tr", {}, h("td", {}, k.replaceAll("_", " ")), num(v)))));
  });
}

async function security(view, gen, parts, params) {
  const after = params.get("after") || "";
  const limit = 100;
  const body = h("div", {}, "Loading…");
  replace(view, h("h1", {}, "Security events"), body);
  const r = await get("/security/events" + query({ after, limit }));
  if (!current(gen)) return;
  const last = r.items.length === limit ? r.items[r.items.length - 1].seq : null;
  replace(body,
    table(["#", "Time", "Kind", "Device", "Address", "Detail"], r.items.map((e) => h("tr", {},
      h("td", {}, e.seq), h("td", {}, fmtTime(e.ts_ms)), h("td", {}, e.kind),
      h("td", {}, e.device_id ? h("a", { href: "#/devices/" + enc(e.device_id) }, e.device_id) : "—"),
      h("td", {}, e.addr || "—"), h("td", {}, h("code", {}, json(e.detail))))), "No security events."),
    h("div", { class: "pager" },
      after ? h("a", { href: "#/security" }, "First page") : null,
      last !== null ? h("a", { href: "#/security?after=" + last }, "Next page") : null));
}

// ---- Start -----------------------------------------------------------------------

function start() {
  applyTheme(localStorage.getItem(THEME_KEY) || "auto");
  $("theme").addEventListener("click", cycleTheme);
  // Follow the system when it switches between light and dark (on auto).
  systemDark.addEventListener("change", () => {
    const choice = localStorage.getItem(THEME_KEY) || "auto";
    if (choice === "auto") { applyTheme(choice); render(); }
  });
  $("logout").addEventListener("click", () => logout());
  window.addEventListener("hashchange", render);
  render();
}

// A module runs after the document is parsed (like `defer`).
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
