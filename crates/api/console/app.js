// m2mhub operator console: a single-page app over /api/v1, no framework.
//
// Model: the URL fragment names the page (#/devices/abc); `render()` runs the
// page function, which builds DOM nodes with `h()` (text always goes in as
// text nodes: no data ever passes through innerHTML). Each page may start
// timers with `every()` and live streams with `live()`; both stop when the
// page changes. Async work checks
// `current(gen)` so a slow answer never draws over a newer page.
"use strict";

const TOKEN_KEY = "m2mhub.token";
const state = { me: null, gen: 0, timers: [], streams: [] };

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
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toLocaleString();
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


// Stop what the current page started: timers and live streams.
function stopPage() {
  state.gen += 1;
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.streams.forEach((c) => c.abort());
  state.streams = [];
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
  ["#/settings", "Fleet settings", () => true],
  ["#/ota", "Firmware", () => true],
  ["#/audit", "Audit", isAdmin],
  ["#/security", "Security events", () => true],
];

async function render() {
  stopPage();
  clearError();
  const { parts, params } = parseHash();
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
    ota: parts[1] ? campaign : firmware, settings: fleetSettings,
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
  replace(view,
    h("h1", {}, "Fleet overview ", badge),
    h("div", { class: "cards" },
      card("total", "Devices"), card("online", "Online"), card("offline", "Offline"), card("rate", "Messages / s")),
    h("h2", {}, "Active alarms"), alarmsBox);
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
  // Alarm and connection changes arrive live and refresh the figures at
  // once; the message rate is sampled every 5 s.
  let pending = null;
  const soon = () => { clearTimeout(pending); pending = setTimeout(() => { if (current(gen)) sample().catch(showError); }, 300); };
  live("", { alarm: soon, connections: soon, lagged: soon }, badge);
  await every(5000, sample);
  // A second sample soon, so the rate shows without waiting 5 s.
  setTimeout(() => { if (current(gen)) sample().catch(showError); }, 1000);
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

const RANGES = { "1h": { from: "-1h", bucket: "1m" }, "24h": { from: "-24h", bucket: "15m" }, "7d": { from: "-7d", bucket: "2h" } };
const TERMINAL = ["answered", "failed", "timed_out"];

async function device(view, gen, parts, params) {
  const id = parts[1];
  const path = "/devices/" + enc(id);
  const range = RANGES[params.get("range")] ? params.get("range") : "24h";
  const meta = h("div", {}, "Loading…");
  const creds = h("div", {});
  const latest = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const charts = h("div", { class: "charts" });
  const events = h("div", {});
  const connections = h("div", {});
  const alarmBox = h("div", {});
  const commands = h("div", {});
  const shadowBox = h("div", {});
  const diagBox = h("div", {});
  const badge = liveBadge();
  const rangeTabs = h("div", { class: "tabs" }, Object.keys(RANGES).map((k) =>
    h("a", { href: "#/devices/" + enc(id) + "?range=" + k, class: k === range ? "active" : null }, k)));
  replace(view,
    h("h1", {}, "Device ", h("code", {}, id), " ", badge), meta,
    h("h2", {}, "Latest values"), latest,
    h("h2", {}, "Active alarms"), alarmBox,
    h("h2", {}, "Commands"), commands,
    h("h2", {}, "Shadows"), shadowBox,
    h("h2", {}, "Diagnostics"), diagBox,
    h("h2", {}, "History"), rangeTabs, charts,
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
    row("MQTT session", d.session ? json(d.session) : "none"))));

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
      await drawCharts(numeric);
    }
  };

  const drawCharts = async (metrics) => {
    const { from, bucket } = RANGES[range];
    const results = await Promise.all(metrics.map((m) =>
      get("/telemetry/aggregate" + query({ metric: m, device: id, from, bucket, fn: "avg,min,max" }))
        .catch((e) => ({ error: e.message }))));
    if (!current(gen)) return;
    replace(charts, metrics.map((m, i) => h("div", { class: "card" },
      h("strong", {}, m), " ", h("span", { class: "muted" }, "avg, min–max per " + bucket),
      results[i].error ? h("p", { class: "error" }, results[i].error)
        : lineChart(((results[i].series || [])[0] || { buckets: [] }).buckets, results[i].from_ms, results[i].to_ms))));
    if (!metrics.length) replace(charts, h("p", { class: "muted" }, "No numeric metrics."));
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

  const history = [];
  const drawConnections = () => replace(connections, table(["Time", "", "Detail"], history.slice(0, 20).map((e) => h("tr", {},
    h("td", {}, fmtTime(e.ts_ms)), h("td", {}, h("span", { class: "dot" + (e.online ? " on" : "") })), h("td", {}, e.detail))),
  "No connections recorded yet."));
  const loadConnections = async () => {
    const r = await get(path + "/events" + query({ kind: "connection", limit: 20 }));
    if (!current(gen)) return;
    history.splice(0, history.length, ...r.items.map((e) => ({ ts_ms: e.ts_ms, online: !e.detail.startsWith("disconnected"), detail: e.detail })));
    drawConnections();
  };

  live("?device=" + enc(id), {
    telemetry: (ev) => {
      for (const [m, p] of Object.entries(ev.values)) setValue(m, p.value, p.ts_ms);
      drawLatest();
      replace(lastSeen, fmtTime(ev.ts_ms) + " (just now)");
    },
    connection: (ev) => {
      replace(online, ev.online ? "yes" : "no");
      if (ev.online) replace(lastAddr, ev.detail.replace(/^connected from (\S+).*$/, "$1"));
      history.unshift(ev);
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
  every(60000, () => drawCharts(charted ? charted.split("\n") : []));
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

// An SVG line chart: the avg line over the min–max band.
function lineChart(buckets, fromMs, toMs) {
  const W = 360, H = 140, L = 44, R = 8, T = 8, B = 20;
  const pts = buckets.filter((b) => typeof b.avg === "number");
  if (!pts.length) return h("p", { class: "muted" }, "No data in this range.");
  let lo = Math.min(...pts.map((b) => (typeof b.min === "number" ? b.min : b.avg)));
  let hi = Math.max(...pts.map((b) => (typeof b.max === "number" ? b.max : b.avg)));
  if (hi === lo) { hi += 1; lo -= 1; }
  const t0 = fromMs || pts[0].ts_ms, t1 = toMs || pts[pts.length - 1].ts_ms;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const band = pts.map((b) => x(b.ts_ms) + "," + y(typeof b.max === "number" ? b.max : b.avg))
    .concat(pts.slice().reverse().map((b) => x(b.ts_ms) + "," + y(typeof b.min === "number" ? b.min : b.avg)));
  const grid = [lo, (lo + hi) / 2, hi].map((v) => [
    s("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
    s("text", { class: "axis", x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmtValue(Number(v.toPrecision(4)))),
  ]);
  const ticks = [t0, t1].map((t, i) =>
    s("text", { class: "axis", x: i ? W - R : L, y: H - 5, "text-anchor": i ? "end" : "start" }, new Date(t).toLocaleString()));
  return s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" },
    grid, ticks,
    s("polygon", { class: "band", points: band.join(" ") }),
    s("polyline", { class: "avg", points: pts.map((b) => x(b.ts_ms) + "," + y(b.avg)).join(" ") }));
}

// ---- Map -----------------------------------------------------------------------

async function map(view, gen) {
  const box = h("div", {}, "Loading…");
  const badge = liveBadge();
  replace(view, h("h1", {}, "Map ", badge),
    h("p", { class: "muted" }, "Devices that reported lat/lon in the last 24 h, at their latest position; geofences of the rules (inside(lat, lon, 'POLYGON…')) as shaded areas."), box);
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
  const positions = new Map(); // device → { lat, lon }
  let fences = [];
  let drawn = null;
  const draw = () => {
    const pts = [...positions].map(([id, p]) => ({ id, lat: p.lat, lon: p.lon }));
    // The view is fitted on the first draw and when a device leaves it, so
    // pins move smoothly instead of the map rescaling at every update.
    if (!drawn || pts.some((p) => !drawn.contains(p))) drawn = mapView(pts, fences);
    replace(box, pts.length ? mapSvg(pts, fences, drawn) : h("p", { class: "muted" }, "No device reports a position."));
  };
  const load = async () => {
    const [lat, lon, rs] = await Promise.all([lastOf("lat"), lastOf("lon"), get("/rules").catch(() => ({ items: [] }))]);
    if (!current(gen)) return;
    fences = rs.items.flatMap((r) => geofences(r.sql || "").map((ring) => ({ rule: r.name || r.id, ring })));
    for (const [d, v] of lat) {
      if (lon.has(d) && Math.abs(v) <= 90 && Math.abs(lon.get(d)) <= 180) positions.set(d, { lat: v, lon: lon.get(d) });
    }
    draw();
  };
  live("", {
    positions: (ev) => { for (const p of ev.items) positions.set(p.device, { lat: p.lat, lon: p.lon }); draw(); },
    lagged: () => load().catch(showError),
  }, badge);
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

// The projection that fits the points and fences.
function mapView(pts, fences) {
  const W = 900, H = 520, P = 30;
  const lons = pts.map((p) => p.lon).concat(fences.flatMap((f) => f.ring.map((c) => c[0])));
  const lats = pts.map((p) => p.lat).concat(fences.flatMap((f) => f.ring.map((c) => c[1])));
  let [x0, x1] = [Math.min(...lons), Math.max(...lons)];
  let [y0, y1] = [Math.min(...lats), Math.max(...lats)];
  const pad = Math.max(0.01, (x1 - x0) * 0.1, (y1 - y0) * 0.1);
  x0 -= pad; x1 += pad; y0 -= pad; y1 += pad;
  // Equirectangular with the longitude squeezed by cos(latitude): shapes
  // stay about right over a city or a country.
  const k = Math.cos(((y0 + y1) / 2) * Math.PI / 180) || 1;
  const scale = Math.min((W - 2 * P) / ((x1 - x0) * k), (H - 2 * P) / (y1 - y0));
  return {
    W, H, x0, x1, y0, y1,
    x: (lon) => P + (lon - x0) * k * scale,
    y: (lat) => H - P - (lat - y0) * scale,
    contains: (p) => p.lon >= x0 && p.lon <= x1 && p.lat >= y0 && p.lat <= y1,
  };
}

function mapSvg(pts, fences, v) {
  const { W, H, x, y, x0, x1, y0, y1 } = v;
  const step = niceStep((y1 - y0) / 5);
  const grid = [];
  for (let g = Math.ceil(y0 / step) * step; g <= y1; g += step) {
    grid.push(s("line", { class: "grid", x1: 0, x2: W, y1: y(g), y2: y(g) }),
      s("text", { class: "axis", x: 2, y: y(g) - 2 }, g.toFixed(3)));
  }
  for (let g = Math.ceil(x0 / step) * step; g <= x1; g += step) {
    grid.push(s("line", { class: "grid", x1: x(g), x2: x(g), y1: 0, y2: H }),
      s("text", { class: "axis", x: x(g) + 2, y: H - 2 }, g.toFixed(3)));
  }
  const areas = fences.map((f) => s("polygon", { class: "fence", points: f.ring.map((c) => x(c[0]) + "," + y(c[1])).join(" ") },
    s("title", {}, "Geofence of rule " + f.rule)));
  const pins = pts.map((p) => {
    const c = s("circle", { class: "pin", cx: x(p.lon), cy: y(p.lat), r: 5, "data-device": p.id },
      s("title", {}, p.id + " (" + p.lat.toFixed(5) + ", " + p.lon.toFixed(5) + ")"));
    c.addEventListener("click", () => go("#/devices/" + enc(p.id)));
    return c;
  });
  const labels = pts.length <= 50 ? pts.map((p) => s("text", { class: "label", x: x(p.lon) + 7, y: y(p.lat) + 3 }, p.id)) : [];
  return s("svg", { class: "map", viewBox: `0 0 ${W} ${H}`, role: "img" }, grid, areas, pins, labels);
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const f = raw / p;
  return (f < 2 ? 1 : f < 5 ? 2 : 5) * p;
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

async function rules(view, gen) {
  const body = h("div", {}, "Loading…");
  replace(view, h("h1", {}, "Rules"),
    h("div", { class: "toolbar" }, canWrite() ? h("button", { type: "button", class: "primary", onclick: () => go("#/rules/new") }, "New rule") : null),
    body);
  const load = async () => {
    const r = await get("/rules");
    if (!current(gen)) return;
    replace(body, table(["Rule", "Enabled", "Counters", ""], r.items.map((rule) => h("tr", {},
      h("td", {}, h("a", { href: "#/rules/" + enc(rule.id) }, rule.name || rule.id), h("div", { class: "muted" }, rule.description || "")),
      h("td", {}, rule.enabled ? "yes" : "no"),
      h("td", {}, rule.counters ? Object.entries(rule.counters).map(([k, v]) => h("div", {}, k + ": " + fmtValue(v))) : h("span", { class: "muted" }, "—")),
      h("td", {}, writeButton(rule.enabled ? "Disable" : "Enable", async () => {
        await api("POST", "/rules/" + enc(rule.id) + (rule.enabled ? "/disable" : "/enable"));
        await load();
      })))), "No rules yet."));
  };
  await every(5000, load);
}

async function ruleForm(view, gen, parts) {
  const id = parts[1] === "new" ? null : parts[1];
  const rule = id ? await get("/rules/" + enc(id)) : { name: "", description: "", sql: "", actions: [], enabled: true };
  if (!current(gen)) return;
  const name = h("input", { value: rule.name || "" });
  const description = h("input", { value: rule.description || "" });
  const sql = h("textarea", { class: "code", rows: 8, spellcheck: "false", value: rule.sql || "" });
  const sqlError = h("div", {});
  const actions = h("textarea", { class: "code", rows: 8, spellcheck: "false", value: JSON.stringify(rule.actions || [], null, 2) });
  const actionsError = h("div", {});
  const enabled = h("input", { type: "checkbox" });
  enabled.checked = !!rule.enabled;
  const readOnly = !canWrite();
  for (const el of [name, description, sql, actions, enabled]) el.disabled = readOnly;
  const form = h("form", { class: "stack" },
    h("label", {}, "Name", name),
    h("label", {}, "Description", description),
    h("label", {}, "SQL", sql), sqlError,
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
    replace(sqlError);
    replace(actionsError);
    let acts;
    try { acts = JSON.parse(actions.value || "[]"); } catch (e) {
      replace(actionsError, h("p", { class: "error" }, "Not JSON: " + e.message));
      return;
    }
    const body = { name: name.value, description: description.value, sql: sql.value, actions: acts, enabled: enabled.checked };
    try {
      const saved = id ? await api("PUT", "/rules/" + enc(id), body) : await api("POST", "/rules", body);
      go("#/rules/" + enc(saved.id));
    } catch (e) {
      if (e instanceof ApiError && e.status === 422) showRuleProblem(e.problem, sql, sqlError, actionsError);
      else showError(e);
    }
  });
  replace(view, h("h1", {}, id ? "Rule " + (rule.name || id) : "New rule"), form);
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

document.addEventListener("DOMContentLoaded", () => {
  $("logout").addEventListener("click", () => logout());
  window.addEventListener("hashchange", render);
  render();
});
