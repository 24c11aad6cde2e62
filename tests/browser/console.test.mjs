// Browser tests of the operator console: the real `m2mhub demo` (server,
// simulated fleet, example rules) on loopback, driven in Debian's headless
// Chromium by playwright-core. Run by `.ci/run` after `cargo test` built the
// binary; `M2MHUB_BIN` and `CHROMIUM` override the paths.
//
// What a first-time operator does: log in, find a device, watch a live value
// change, send a command and see the device answer, create a rule with an
// error and then without, acknowledge the alarm it raises; and a viewer sees
// the same pages without any control that changes something. The map works
// with no internet (its embedded basemap), clusters the fleet and replays a
// truck's route; charts change range and zoom; every page is photographed
// (screenshots/, or SCREENSHOT_DIR) in light and dark, desktop and phone.
//
// No page may reach another host: every request elsewhere is blocked (as on
// a machine with no internet) and fails the test — but for the map's tile
// server, which the console is configured with and whose requests are
// expected (and blocked, so the basemap must show).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, createWriteStream, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.M2MHUB_BIN || resolve(here, "../../target/debug/m2mhub");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Generous: the CI machine is small and shared.
const WAIT = 20_000;
const SCREENSHOTS = process.env.SCREENSHOT_DIR || join(here, "screenshots");
// The demo runs with the default tile server.
const TILE_ORIGIN = "https://tile.openstreetmap.org";

let demo, dir, logPath, base, user, password, browser;

/// Start `m2mhub demo` and read its banner: console URL and login.
async function startDemo() {
  dir = mkdtempSync(join(tmpdir(), "m2mhub-browser-"));
  logPath = join(dir, "demo.log");
  const log = createWriteStream(logPath);
  demo = spawn(BIN, [
    "demo", "--data-dir", join(dir, "data"),
    "--mqtt-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--mqtts-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0", "--coaps-listen", "127.0.0.1:0",
    "--count", "2", "--interval", "300ms", "--duration", "300s",
  ], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, M2MHUB_CONFIG: "", M2MHUB_MASTER_KEY: "" } });
  demo.stderr.pipe(log);
  const lines = [];
  await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error("no `m2mhub ready` line in 60 s: " + lines.join("\n"))), 60_000);
    let buf = "";
    demo.stdout.on("data", (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        lines.push(line);
        if (line.startsWith("m2mhub ready")) { clearTimeout(timer); ok(); }
      }
    });
    demo.on("exit", (code) => { clearTimeout(timer); fail(new Error("demo exited with " + code + ": " + lines.join("\n"))); });
  });
  const after = (prefix) => {
    const l = lines.map((x) => x.trim()).find((x) => x.startsWith(prefix));
    assert.ok(l, `no ${prefix} line in ${lines.join("\n")}`);
    return l.slice(prefix.length).trim();
  };
  base = after("console:").replace(/\/$/, "");
  user = after("user:");
  password = after("password:");
}

before(async () => {
  await startDemo();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // As root in a container, without GPU, and without Chromium's own
    // background traffic (this machine has no internet).
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (demo && demo.exitCode === null) {
    demo.kill("SIGTERM");
    await new Promise((ok) => { demo.once("exit", ok); setTimeout(ok, 10_000); });
  }
  if (process.env.KEEP_BROWSER_TEST_DIR) console.log("data and log kept in " + dir);
  else if (dir) rmSync(dir, { recursive: true, force: true });
});

/// The API as the admin (for setup and for checking what the UI did).
async function apiAs(token, method, path, body) {
  const r = await fetch(base + "/api/v1" + path, {
    method,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  assert.ok(r.ok, `${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function login(name, pass) {
  const r = await fetch(base + "/api/v1/auth/login", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username: name, password: pass }),
  });
  assert.equal(r.status, 200);
  return (await r.json()).token;
}

/// A new page that fails the test on any script error, console error or
/// request to another host (the console must work with no internet).
/// Every request to another host is blocked; the tile server's are
/// counted in `tiles` (they are expected, and fail as with no internet).
async function newPage(options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  const page = await context.newPage();
  const errors = [];
  const tiles = [];
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(base + "/") || url === base) return route.continue();
    if (url.startsWith(TILE_ORIGIN + "/")) tiles.push(url);
    else errors.push("request to another host: " + url);
    return route.abort("internetdisconnected");
  });
  page.on("pageerror", (e) => errors.push("page error: " + e.message));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // The blocked tiles' load failures are expected.
    if ((m.location().url || "").startsWith(TILE_ORIGIN)) return;
    if (!/401|404|422/.test(m.text())) errors.push("console: " + m.text());
  });
  page.setDefaultTimeout(WAIT);
  return { page, context, errors, tiles };
}

/// No script or console error, no request to another host, and no error
/// banner left on the page.
async function assertClean(page, errors) {
  assert.deepEqual(errors, []);
  const banner = page.locator("#banner");
  assert.ok(!(await banner.isVisible()), "error banner: " + (await banner.textContent()));
}

/// Save a screenshot of the page (to look at; the folder is gitignored).
async function shot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: join(SCREENSHOTS, name + ".png"), fullPage: true });
}

async function logInThroughTheForm(page, name, pass) {
  await page.goto(base + "/");
  await page.fill("input[name=username]", name);
  await page.fill("input[name=password]", "not the password");
  await page.click("button[type=submit]");
  // A wrong password is refused on the form.
  await page.locator("form.login .error").filter({ hasText: /wrong user name or password/ }).waitFor();
  await page.fill("input[name=password]", pass);
  await page.click("button[type=submit]");
  await page.locator("#who").filter({ hasText: name }).waitFor();
}

test("an operator logs in, finds a device, watches it live, commands it, writes a rule and acknowledges its alarm", async () => {
  const { page, context, errors } = await newPage();
  try {
    // Log in.
    await logInThroughTheForm(page, user, password);
    await page.locator("h1", { hasText: "Fleet overview" }).waitFor();
    await page.locator(".livebadge.on").waitFor();

    // Find a device: the factory group, then a search for one machine.
    await page.click("#nav a[href='#/devices']");
    await page.fill("input[placeholder=Group]", "factory");
    await page.press("input[placeholder=Group]", "Enter");
    await page.waitForURL(/group=factory/);
    const first = page.locator("main table tbody tr td a").first();
    await first.waitFor();
    const id = (await first.textContent()).trim();
    const search = page.locator("input[type=search]");
    await search.fill(id);
    await page.waitForURL(new RegExp("search=" + encodeURIComponent(id)));
    const rows = page.locator("main table tbody tr");
    await rows.filter({ hasText: id }).first().waitFor();
    await page.click(`main table a:text-is("${id}")`);
    await page.locator("h1", { hasText: "Device" }).filter({ hasText: id }).waitFor();

    // Watch a live value change: the temperature cell updates without a
    // reload (the page is not polled for values; the stream brings them).
    await page.locator("h1 .livebadge.on").waitFor();
    const temp = page.locator("tr[data-metric=temperature] td.value");
    await temp.waitFor();
    const firstValue = (await temp.textContent()).trim();
    await page.waitForFunction(([sel, v]) => {
      const el = document.querySelector(sel);
      return el && el.textContent.trim() !== v;
    }, ["tr[data-metric=temperature] td.value", firstValue], { timeout: WAIT });
    // Its live chart has points.
    await page.locator("tr[data-metric=temperature] svg.spark polyline").waitFor();
    await shot(page, "device");
    // The connection history shows the device connecting.
    await page.locator("h2:text('Connection history') + div").filter({ hasText: /connected from 127\.0\.0\.1/ }).waitFor();

    // Send a command; the simulated machine answers it.
    await page.fill("form input[placeholder^='name']", "shutdown");
    await page.fill("form:has(input[placeholder^='name']) textarea", '{"reason": "browser test"}');
    await page.click("form button:text('Send')");
    await page.locator("form p").filter({ hasText: /answered/ }).waitFor();
    await page.locator("main table").filter({ hasText: "shutdown" }).filter({ hasText: "answered" }).first().waitFor();

    // Change its classic shadow's desired state: the simulated machine is
    // told the delta, applies it and reports it back, and the panel shows
    // the reported value (it refreshes every 10 s).
    const classic = page.locator(".shadow[data-shadow='(classic)']");
    await classic.locator("textarea.shadow-desired").fill('{"browser_setpoint": 42}');
    await classic.locator("button:text('Merge into desired')").click();
    await classic.locator("td.reported").filter({ hasText: "browser_setpoint" }).waitFor({ timeout: 30_000 });
    const tokenForShadow = await login(user, password);
    const shadowDoc = await apiAs(tokenForShadow, "GET", "/devices/" + encodeURIComponent(id) + "/shadow");
    assert.equal(shadowDoc.state.desired.browser_setpoint, 42, JSON.stringify(shadowDoc));
    assert.equal(shadowDoc.state.reported.browser_setpoint, 42, JSON.stringify(shadowDoc));

    // A fleet-wide setting for the factory group: the machines report it
    // back and the progress bar fills.
    await page.click("#nav a[href='#/settings']");
    await page.fill(".settings-form input[name=group]", "factory");
    await page.fill(".settings-form textarea[name=state]", '{"browser_eco": true}');
    await page.click(".settings-form button[type=submit]");
    await page.locator("main tr[data-setting] .reported", { hasText: /^2 of 2 reported/ }).first().waitFor({ timeout: 30_000 });
    await page.goBack();
    await page.locator("h1", { hasText: "Device" }).filter({ hasText: id }).waitFor();

    // Ask the machine for a diagnostic bundle: it uploads one, and the
    // operator downloads it.
    await page.fill(".diag-form input[name=reason]", "browser test");
    await page.click(".diag-form button");
    const bundleRow = page.locator("main tr[data-bundle]").first();
    await bundleRow.locator("td.status", { hasText: "uploaded" }).waitFor({ timeout: 30_000 });
    const [dl] = await Promise.all([page.waitForEvent("download"), bundleRow.locator("button:text('Download')").click()]);
    const bundle = JSON.parse(readFileSync(await dl.path(), "utf8"));
    assert.ok(bundle && typeof bundle === "object", "the bundle is a JSON document");

    // Create a rule with an error: the parser's message sits under the SQL
    // with a caret at the faulty column.
    await page.click("#nav a[href='#/rules']");
    await page.click("button:text('New rule')");
    await page.fill("form label:has-text('Name') input", "Browser test: hot");
    const badSql = "SELECT device, temperature\nFROM 'devices/+/telemetry'\nWHERE temperature >> -1000";
    await page.fill("form textarea.code >> nth=0", badSql);
    await page.fill("form textarea.code >> nth=1", JSON.stringify([{ type: "alarm", alarm_type: "browser-test", severity: "minor" }]));
    await page.click("form button:text('Create')");
    const caret = page.locator(".caret");
    await caret.waitFor();
    const caretText = await caret.textContent();
    await shot(page, "rule-error");
    assert.match(caretText, /Line 3, column \d+/, caretText);
    assert.match(await caret.locator("pre").textContent(), /\^/);
    // The textarea selects the position.
    const sel = await page.locator("form textarea.code >> nth=0").evaluate((t) => [t.selectionStart, t.value]);
    assert.ok(sel[0] > badSql.indexOf("WHERE"), `selection at ${sel[0]}`);
    // Nothing was created.
    const token = await login(user, password);
    const before = await apiAs(token, "GET", "/rules");
    assert.ok(!before.items.some((r) => r.name === "Browser test: hot"));

    // Then without the error, for this one device.
    await page.fill("form textarea.code >> nth=0",
      `SELECT device, temperature FROM 'devices/${id}/telemetry' WHERE temperature > -1000`);
    await page.click("form button:text('Create')");
    await page.waitForURL(/#\/rules\/[^/]+$/);
    await page.locator("h1", { hasText: "Browser test: hot" }).waitFor();
    // The SQL is shown highlighted: keywords, the topic string, numbers.
    assert.equal(await page.locator("pre.sql .sql-kw", { hasText: "SELECT" }).count(), 1);
    assert.equal(await page.locator("pre.sql .sql-string").first().textContent(), `'devices/${id}/telemetry'`);
    assert.ok(await page.locator("pre.sql .sql-number").count() >= 1);
    const rules = await apiAs(token, "GET", "/rules");
    assert.ok(rules.items.some((r) => r.name === "Browser test: hot" && r.enabled));

    // The shut-down machine still reports; the rule raises its alarm, which
    // appears on the alarms page without a reload. Acknowledge it.
    await page.click("#nav a[href='#/alarms']");
    const row = page.locator("main table tbody tr").filter({ hasText: "browser-test" }).filter({ hasText: id });
    await row.waitFor({ timeout: 30_000 });
    await row.locator("button:text('Acknowledge')").click();
    await row.locator("td.acked").filter({ hasText: "by " + user }).waitFor();
    await shot(page, "alarms");
    const alarms = await apiAs(token, "GET", "/alarms?status=active&type=browser-test");
    const mine = alarms.items.find((a) => a.device_id === id);
    assert.ok(mine && mine.acked && mine.acked_by === user, JSON.stringify(alarms));

    await assertClean(page, errors);
  } catch (e) {
    await page.screenshot({ path: join(dir, "operator-failure.png"), fullPage: true }).catch(() => {});
    console.log("screenshot: " + join(dir, "operator-failure.png") + "\nserver log tail:\n" + readFileSync(logPath, "utf8").slice(-4000));
    throw e;
  } finally {
    await context.close();
  }
});

test("an operator follows the demo's firmware campaign wave by wave, pauses and resumes it", async () => {
  const { page, context, errors } = await newPage();
  try {
    await logInThroughTheForm(page, user, password);
    await page.click("#nav a[href='#/ota']");
    // The demo's image and campaign, with their forms for an operator.
    await page.locator("main table td", { hasText: "meter-firmware" }).first().waitFor();
    await page.locator("form h2", { hasText: "Upload an image" }).waitFor();
    await page.locator("main a", { hasText: "Meter firmware 1.1.0" }).click();
    await page.locator("h1", { hasText: "Meter firmware 1.1.0" }).waitFor();
    // The simulated meters of the first wave download, verify, install
    // and report: the bar turns green.
    await page.locator(".progress .seg[data-state=succeeded]").first().waitFor({ timeout: 60_000 });
    await shot(page, "ota-campaign");
    // The second wave waits 30 s after the first: pause and resume meanwhile.
    const status = page.locator("h1 .badge");
    if ((await status.textContent()) === "running") {
      await page.click("button:text('Pause')");
      await page.locator("h1 .badge", { hasText: "paused" }).waitFor();
      await page.click("button:text('Resume')");
      await page.locator("h1 .badge", { hasText: /running|completed/ }).waitFor();
    }
    await assertClean(page, errors);
  } catch (e) {
    await page.screenshot({ path: join(dir, "ota-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
  }
});

test("an operator defines a monthly report, runs it and downloads its CSV; a viewer reads it without controls", async () => {
  const { page, context, errors } = await newPage({ acceptDownloads: true });
  try {
    await logInThroughTheForm(page, user, password);
    await page.click("#nav a[href='#/reports']");
    await page.click("button:text('New report')");
    await page.fill(".report-form input[name=name]", "Meter energy");
    await page.selectOption(".report-form select[name=every]", "monthly");
    await page.fill(".report-form input[name=day]", "31");
    // A time zone the server does not know is refused, naming the field.
    await page.fill(".report-form input[name=time_zone]", "Mars/Olympus");
    await page.click(".report-form button[type=submit]");
    await page.locator("#banner", { hasText: "time_zone" }).waitFor();
    await page.fill(".report-form input[name=time_zone]", "Europe/Berlin");
    await page.click(".report-form button[type=submit]");
    await page.locator("h1", { hasText: "Report Meter energy" }).waitFor();
    await page.locator("main p", { hasText: "monthly on day 31 at 06:00 (Europe/Berlin)" }).waitFor();
    await page.click("button:text('Run now')");
    const run = page.locator("main table tr[data-run]").first();
    await run.waitFor();
    const [download] = await Promise.all([page.waitForEvent("download"), run.locator("button:text('CSV')").click()]);
    const csv = readFileSync(await download.path(), "utf8");
    assert.match(csv, /^device,date,energy,readings\r\n/);
    await shot(page, "report");
    await assertClean(page, errors);
  } catch (e) {
    await page.screenshot({ path: join(dir, "report-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
  }
  const token = await login(user, password);
  await apiAs(token, "POST", "/users", { username: "report-reader", password: "correct horse battery", role: "viewer" });
  const viewer = await newPage();
  try {
    await logInThroughTheForm(viewer.page, "report-reader", "correct horse battery");
    await viewer.page.click("#nav a[href='#/reports']");
    await viewer.page.locator("main table a", { hasText: "Meter energy" }).click();
    await viewer.page.locator("main table tr[data-run]").first().waitFor();
    assert.equal(await viewer.page.locator("button:text('Run now'), button:text('Delete'), button[type=submit]").count(), 0);
    assert.ok(await viewer.page.locator(".report-form input[name=name]").isDisabled());
    await assertClean(viewer.page, viewer.errors);
  } finally {
    await viewer.context.close();
  }
});

test("a viewer sees the fleet live but no control that changes anything", async () => {
  const token = await login(user, password);
  await apiAs(token, "POST", "/users", { username: "watcher", password: "correct horse battery", role: "viewer" });
  const { page, context, errors } = await newPage();
  try {
    await logInThroughTheForm(page, "watcher", "correct horse battery");
    await page.locator("#who").filter({ hasText: "viewer" }).waitFor();
    // No audit log in the navigation (admins only).
    assert.equal(await page.locator("#nav a[href='#/audit']").count(), 0);
    // A device page: live values, but no command form and no credential buttons.
    const devices = await apiAs(token, "GET", "/devices?group=truck&limit=1");
    const id = devices.items[0].id;
    await page.goto(base + "/#/devices/" + encodeURIComponent(id));
    await page.locator("h1 .livebadge.on").waitFor();
    await page.locator("tr[data-metric=lat] td.value").waitFor();
    assert.equal(await page.locator("form button:text('Send')").count(), 0);
    assert.equal(await page.locator("button:text('Issue token')").count(), 0);
    assert.equal(await page.locator("button:text('Revoke')").count(), 0);
    await page.locator(".shadow").first().waitFor();
    assert.equal(await page.locator("button:text('Merge into desired')").count(), 0);
    // The map shows the trucks and the geofence of the example rule, live.
    await page.click("#nav a[href='#/map']");
    await page.locator("#fleet-map .pin, #fleet-map .marker-cluster").first().waitFor();
    await page.locator("#fleet-map path.fence").first().waitFor();
    await page.locator("h1 .livebadge.on").waitFor();
    // Rules and alarms are readable, not changeable.
    await page.click("#nav a[href='#/rules']");
    await page.locator("main table").waitFor();
    assert.equal(await page.locator("button:text('New rule')").count(), 0);
    assert.equal(await page.locator("button:text('Disable')").count(), 0);
    await page.click("#nav a[href='#/alarms']");
    await page.locator("main table, main p.muted").first().waitFor();
    assert.equal(await page.locator("button:text('Acknowledge')").count(), 0);
    // Firmware: campaigns visible, no upload or campaign form, no buttons.
    await page.click("#nav a[href='#/ota']");
    await page.locator("main table td", { hasText: "meter-firmware" }).first().waitFor();
    assert.equal(await page.locator("form h2", { hasText: "Upload an image" }).count(), 0);
    assert.equal(await page.locator("button:text('Delete')").count(), 0);
    // And the API refuses the viewer's token even if the UI were bypassed.
    const viewerToken = await page.evaluate(() => sessionStorage.getItem("m2mhub.token"));
    const r = await fetch(base + "/api/v1/rules", {
      method: "POST", headers: { Authorization: "Bearer " + viewerToken, "Content-Type": "application/json" },
      body: JSON.stringify({ name: "x", sql: "SELECT * FROM 'devices/+/telemetry'", actions: [] }),
    });
    assert.equal(r.status, 403);
    assert.equal(r.headers.get("content-type"), "application/problem+json");
    await assertClean(page, errors);
  } catch (e) {
    await page.screenshot({ path: join(dir, "viewer-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
  }
});

/// Run `body` on a new page (see `newPage`); on failure keep a screenshot
/// named `name` beside the demo's data; close the page whatever happens.
async function withPage(name, options, body) {
  const p = await newPage(options);
  try {
    await body(p);
    await assertClean(p.page, p.errors);
  } catch (e) {
    await p.page.screenshot({ path: join(dir, name + "-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await p.context.close();
  }
}

/// Log in through the API and hand the token to the page (faster than the
/// form, which the first test covers).
async function loggedIn(page, name = user, pass = password) {
  const token = await login(name, pass);
  await page.goto(base + "/");
  await page.evaluate((t) => sessionStorage.setItem("m2mhub.token", t), token);
  return token;
}

test("the map shows the embedded basemap with no internet, clusters the fleet, replays a truck's route and stays smooth with 5,000 trucks", () =>
  withPage("map", {}, async ({ page, tiles }) => {
    const token = await loggedIn(page);
    const trucks = await apiAs(token, "GET", "/devices?group=truck&limit=10");
    const truck = trucks.items[0].id;
    await page.goto(base + "/#/map");
    const map = page.locator("#fleet-map");
    // The basemap: land and borders from the embedded Natural Earth file,
    // drawn although every tile request failed.
    await map.locator("path.bm-land").first().waitFor();
    await page.waitForFunction(() => document.querySelector("#fleet-map").dataset.loaded === "true");
    await page.waitForFunction(() => Number(document.querySelector("#fleet-map").dataset.tilesFailed || 0) > 0);
    assert.ok(tiles.length > 0, "the map asked its tile server for tiles");
    // The land is painted (a filled path with a real extent on screen).
    const land = await map.locator("path.bm-land").first().boundingBox();
    assert.ok(land && land.width > 100 && land.height > 50, JSON.stringify(land));
    // The trucks: markers, and a cluster once zoomed out to the continent.
    await map.locator(".pin").first().waitFor();
    await shot(page, "map");
    await page.evaluate(() => document.querySelector("#fleet-map").leafletFleet.group._map.setZoom(4, { animate: false }));
    await map.locator(".marker-cluster").first().waitFor();
    // At a continent's zoom the borders show too.
    await map.locator("path.bm-border").first().waitFor();
    const clustered = await map.locator(".marker-cluster").first().textContent();
    assert.ok(Number(clustered.trim()) >= 2, "a cluster counts the trucks: " + clustered);
    await shot(page, "map-clusters");

    // Route replay: the truck's stored path of the last 15 minutes, drawn,
    // then played and scrubbed.
    await page.selectOption("select[name=track-device]", truck);
    await page.selectOption("select[name=track-range]", "15m");
    await page.click("button:text('Show track')");
    await map.locator("path.track").waitFor();
    await page.waitForFunction(() => Number(document.querySelector("#fleet-map").dataset.trackPoints) >= 3);
    const n = Number(await map.getAttribute("data-track-points"));
    await page.click("button:text('Play')");
    await page.waitForFunction(() => Number(document.querySelector("#fleet-map").dataset.replayAt) > 0);
    await page.click("button:text('Pause')");
    const scrub = page.locator("input[aria-label='Replay position']");
    await scrub.focus();
    await page.keyboard.press("End");
    await page.waitForFunction((last) => Number(document.querySelector("#fleet-map").dataset.replayAt) === last, n - 1);
    await page.keyboard.press("Home");
    await page.waitForFunction(() => document.querySelector("#fleet-map").dataset.replayAt === "0");
    await shot(page, "map-track");

    // 5,000 trucks: added in one batch, then all moved (as a second of the
    // live stream would), each within a bound that keeps the page usable,
    // and zooming stays responsive (no frame gap over a second).
    const perf = await page.evaluate(async () => {
      const fleet = document.querySelector("#fleet-map").leafletFleet;
      const lm = fleet.group._map;
      const list = (d) => Array.from({ length: 5000 }, (_, i) => ({
        id: "load-" + i, lat: 45 + ((i * 7919) % 1000) / 100 + d, lon: 2 + ((i * 104729) % 1800) / 100 + d,
      }));
      let t = performance.now();
      fleet.update(list(0));
      fleet.flush();
      const add = performance.now() - t;
      t = performance.now();
      fleet.update(list(0.001));
      fleet.flush();
      const move = performance.now() - t;
      let gap = 0, last = performance.now();
      const watch = (end) => new Promise((ok) => {
        const f = () => { const n = performance.now(); gap = Math.max(gap, n - last); last = n; if (n < end) requestAnimationFrame(f); else ok(); };
        requestAnimationFrame(f);
      });
      const until = performance.now() + 2500;
      lm.setView([50, 10], 6);
      setTimeout(() => lm.setZoom(8), 800);
      await watch(until);
      return { add, move, gap, markers: fleet.count() };
    });
    assert.ok(perf.markers >= 5000, JSON.stringify(perf));
    assert.ok(perf.add < 5000 && perf.move < 5000 && perf.gap < 1500, JSON.stringify(perf));
    console.log("5,000 markers: " + JSON.stringify(perf));
    await shot(page, "map-5000");
  }));

test("an operator draws a geofence on the map and makes it a rule", () =>
  withPage("geofence", {}, async ({ page }) => {
    await loggedIn(page);
    await page.goto(base + "/#/map");
    const map = page.locator("#fleet-map");
    await map.locator("path.bm-land").first().waitFor();
    await page.waitForFunction(() => document.querySelector("#fleet-map").dataset.loaded === "true");
    // Zoomed out, the fleet is one cluster in the middle: the corners go
    // around it, away from the zoom buttons.
    await page.evaluate(() => document.querySelector("#fleet-map").leafletFleet.group._map.setZoom(3, { animate: false }));
    const fencesBefore = await page.evaluate(() => document.querySelectorAll("#fleet-map path.fence").length);
    await page.click("button:text('Draw geofence')");
    const box = await map.boundingBox();
    for (const [fx, fy] of [[0.25, 0.2], [0.8, 0.25], [0.7, 0.8]]) {
      await page.mouse.click(box.x + box.width * fx, box.y + box.height * fy);
    }
    await page.getByText("3 corners").waitFor();
    await map.locator("path.fence-draft").waitFor();
    await shot(page, "geofence-drawn");
    await page.click("button:text('Make a rule')");
    await page.waitForURL(/#\/rules\/new/);
    const sql = await page.locator("form textarea.code >> nth=0").inputValue();
    assert.match(sql, /NOT inside\(lat, lon, 'POLYGON\(\(/, sql);
    await page.click("form button:text('Create')");
    await page.waitForURL(/#\/rules\/[^/]+$/);
    // Back on the map, the new rule's fence is drawn with the others.
    await page.click("#nav a[href='#/map']");
    await page.waitForURL(/#\/map/);
    await map.locator("path.bm-land").first().waitFor();
    try {
      await page.waitForFunction((n) => document.querySelectorAll("#fleet-map path.fence").length === n + 1, fencesBefore, { timeout: 8000 });
    } catch (e) {
      const now = await page.evaluate(() => [document.querySelectorAll("#fleet-map path.fence").length, document.body.innerText.slice(0, 600)]);
      throw new Error(`fences before ${fencesBefore}, now ${JSON.stringify(now)}: ${e}`);
    }
  }));

test("a device's chart changes range, zooms by dragging, pans, and tails live values", () =>
  withPage("chart", {}, async ({ page }) => {
    const token = await loggedIn(page);
    const trucks = await apiAs(token, "GET", "/devices?group=truck&limit=1");
    const id = trucks.items[0].id;
    await page.goto(base + "/#/devices/" + encodeURIComponent(id) + "?range=15m");
    const box = page.locator(".chart-box[data-chart=history]");
    await box.locator("canvas").waitFor();
    await page.waitForFunction(() => Number(document.querySelector(".chart-box[data-chart=history]").dataset.points) > 2);
    // Two metrics on one chart by default; a third can be added.
    const shown = (await box.getAttribute("data-metrics")).split(",");
    assert.equal(shown.length, 2, shown.join());
    const extra = page.locator(".metric-picks input:not(:checked)").first();
    await extra.check();
    await page.waitForFunction(() => document.querySelector(".chart-box[data-chart=history]").dataset.metrics.split(",").length === 3);
    // The live tail: points arrive without a reload.
    const before = Number(await box.getAttribute("data-points"));
    await page.waitForFunction((n) => Number(document.querySelector(".chart-box[data-chart=history]").dataset.points) > n, before);
    await box.scrollIntoViewIfNeeded();
    await shot(page, "device-chart-15m");

    // Another range: 6 h, read as buckets with min–max bands.
    await page.click(".tabs a[data-range='6h']");
    await page.waitForURL(/range=6h/);
    await page.locator(".chart-box[data-chart=history][data-range='6h'] canvas").waitFor();
    await page.locator(".toolbar .muted", { hasText: /min–max per 1m/ }).waitFor();

    // Drag across the plot's last minutes (where the young demo has data):
    // the chart zooms in on that span and reads it again in finer buckets.
    const over = page.locator(".chart-box[data-chart=history] .u-over");
    await over.scrollIntoViewIfNeeded();
    const r = await over.boundingBox();
    const viewBefore = await page.locator(".chart-box[data-chart=history]").getAttribute("data-view");
    await page.mouse.move(r.x + r.width * 0.96, r.y + r.height / 2);
    await page.mouse.down();
    await page.mouse.move(r.x + r.width * 0.98, r.y + r.height / 2, { steps: 5 });
    // Past the right edge: the selection stops at now.
    await page.mouse.move(r.x + r.width + 20, r.y + r.height / 2, { steps: 5 });
    await page.mouse.up();
    await page.waitForFunction(() => document.querySelector(".chart-box[data-chart=history]").dataset.zoomed === "true");
    await page.locator(".toolbar .muted", { hasText: /min–max per 5s/ }).waitFor();
    const viewZoomed = await page.locator(".chart-box[data-chart=history]").getAttribute("data-view");
    assert.notEqual(viewZoomed, viewBefore);
    const [a0, a1] = viewZoomed.split("-").map(Number);
    assert.ok(a1 - a0 < 6 * 3600e3 * 0.1, "zoomed to a tenth of the range at most: " + viewZoomed);
    await page.waitForFunction(() => Number(document.querySelector(".chart-box[data-chart=history]").dataset.points) > 2);
    await shot(page, "device-chart-zoomed");
    // Pan with the keyboard, then reset.
    await page.locator(".chart-box[data-chart=history]").focus();
    await page.keyboard.press("ArrowLeft");
    await page.waitForFunction((v) => document.querySelector(".chart-box[data-chart=history]").dataset.view !== v, viewZoomed);
    const [p0] = (await page.locator(".chart-box[data-chart=history]").getAttribute("data-view")).split("-").map(Number);
    assert.ok(p0 < a0, `panned left: ${p0} < ${a0}`);
    await page.click("button:text('Reset zoom')");
    await page.waitForFunction(() => document.querySelector(".chart-box[data-chart=history]").dataset.zoomed === "false");
    await page.locator(".toolbar .muted", { hasText: /min–max per 1m/ }).waitFor();
    // The session panel reads as facts and a table, not JSON.
    const session = page.locator("td.session");
    await session.locator("dl.facts").waitFor();
    assert.ok(!(await session.textContent()).includes("{"), await session.textContent());
  }));

test("an operator backtests a rule before saving it: where it would have fired, on a chart and in a table, with nothing executed", () =>
  withPage("backtest", {}, async ({ page }) => {
    const token = await loggedIn(page);
    const machine = (await apiAs(token, "GET", "/devices?group=factory&limit=1")).items[0].id;
    // A threshold at the median of the machine's last hour: the rule both
    // fires and clears over it.
    let temps = [];
    for (let i = 0; i < 60 && temps.length < 20; i++) {
      const r = await apiAs(token, "GET", `/devices/${encodeURIComponent(machine)}/telemetry/temperature?from=-1h&limit=5000`);
      temps = r.points.map((p) => p[1]).filter((v) => typeof v === "number");
      if (temps.length < 20) await new Promise((ok) => setTimeout(ok, 500));
    }
    assert.ok(temps.length >= 20, "the demo machine reports temperature");
    const median = [...temps].sort((a, b) => a - b)[Math.floor(temps.length / 2)];
    await page.goto(base + "/#/rules/new");
    const sql = page.locator("label", { hasText: "SQL" }).locator("textarea");
    const actions = page.locator("label", { hasText: "Actions" }).locator("textarea");
    // A mistake is shown under the SQL, as when saving.
    await sql.fill("SELECT device, temperature FROM 'devices/+/telemetry' WHERE frobnicate(temperature) > 1");
    await page.click("button[name=backtest]");
    await page.locator(".caret", { hasText: /unknown function/ }).waitFor();
    await sql.fill(`SELECT device, temperature FROM 'devices/+/telemetry' WHERE temperature > ${median} CLEAR WHEN temperature <= ${median}`);
    await actions.fill(JSON.stringify([{ type: "alarm", alarm_type: "backtest-probe", severity: "minor" }]));
    await page.selectOption("select[name=backtest-range]", "1h");
    await page.fill("input[name=backtest-devices]", machine);
    await page.click("button[name=backtest]");
    await page.locator(".backtest-summary").waitFor();
    assert.equal(await page.locator(".caret").count(), 0, "the mistake is gone");
    const fires = page.locator(".backtest-result tr[data-event=fire]");
    await fires.first().waitFor();
    assert.ok((await page.locator(".backtest-result tr[data-event=clear]").count()) >= 1, "it clears too");
    assert.match(await fires.first().textContent(), /raise minor alarm backtest-probe on /);
    // The chart: the machine's temperature with a mark at every fire.
    const box = page.locator(".chart-box[data-chart=backtest]");
    await box.locator("canvas").first().waitFor();
    await page.waitForFunction(() => Number(document.querySelector(".chart-box[data-chart=backtest]").dataset.fires) >= 1);
    assert.equal(await box.getAttribute("data-metric"), "temperature");
    assert.equal(Number(await box.getAttribute("data-fires")), await fires.count());
    await shot(page, "rule-backtest");
    // Nothing was executed or saved.
    const raised = await apiAs(token, "GET", "/alarms?type=backtest-probe");
    assert.equal(raised.items.length, 0);
    const rules = await apiAs(token, "GET", "/rules");
    assert.ok(!rules.items.some((r) => /backtest-probe/.test(JSON.stringify(r.actions))));
  }));

test("an operator builds a dashboard and shares it; the link opens it read-only without login, and refuses writes", async () => {
  let link, dashId, token;
  await withPage("dashboard-edit", {}, async ({ page }) => {
    token = await loggedIn(page);
    const machine = (await apiAs(token, "GET", "/devices?group=factory&limit=1")).items[0].id;
    await page.goto(base + "/#/dashboards");
    await page.fill("input[name=dashboard-name]", "Plant floor");
    await page.click("button:text('New dashboard')");
    await page.locator("h1", { hasText: "Plant floor" }).waitFor();
    await page.waitForURL(/#\/dashboards\/.+edit=1/);
    dashId = decodeURIComponent(page.url().split("#/dashboards/")[1].split("?")[0]);
    const add = async (type, fields) => {
      await page.selectOption("select[name=widget-type]", type);
      for (const [k, v] of Object.entries(fields)) {
        const el = page.locator(`.widget-form [name=widget-${k}]`);
        if ((await el.evaluate((e) => e.tagName)) === "SELECT") await el.selectOption(v);
        else await el.fill(v);
      }
      await page.click("button[name=add-widget]");
    };
    await add("value", { title: "Machine temperature", device: machine, metric: "temperature" });
    await add("gauge", { device: machine, metric: "temperature", min: "0", max: "120" });
    await add("chart", { device: machine, metric: "temperature", range: "1h" });
    await add("alarms", {});
    await add("devices", { group: "factory", metrics: "temperature" });
    await add("group", { title: "Hottest machine", group: "factory", metric: "temperature", fn: "max", range: "1h" });
    await add("map", { group: "truck" });
    assert.equal(await page.locator(".dash-grid .widget").count(), 7);
    // Arrange: the alarm list first, then remove the gauge.
    const alarmsCard = page.locator(".widget[data-widget=alarms]");
    for (let i = 0; i < 3; i++) await alarmsCard.locator("button[aria-label='Move earlier']").click();
    await page.locator(".widget[data-widget=gauge] button[name=remove-widget]").click();
    assert.deepEqual(await page.locator(".dash-grid .widget").evaluateAll((els) => els.map((e) => e.dataset.widget)),
      ["alarms", "value", "chart", "devices", "group", "map"]);
    await page.click("button[name=save]");
    await page.locator("button[name=save]", { hasText: "Saved" }).waitFor();
    const saved = await apiAs(token, "GET", "/dashboards/" + encodeURIComponent(dashId));
    assert.deepEqual(saved.layout.widgets.map((w) => w.type), ["alarms", "value", "chart", "devices", "group", "map"]);
    // The data drawn: a value, a chart, a group figure, a map.
    await page.locator(".widget[data-widget=value] .figure").filter({ hasText: /\d/ }).waitFor();
    await page.locator(".widget[data-widget=chart] canvas").first().waitFor();
    await page.locator(".widget[data-widget=group] .figure").filter({ hasText: /\d/ }).waitFor();
    await page.locator(".widget[data-widget=map] path.bm-land").first().waitFor();
    // Share it.
    await page.selectOption("select[name=share-expiry]", "24h");
    await page.click("button:text('Create link')");
    link = await page.locator("a.share-link").getAttribute("href");
    assert.match(link, /#\/shared\/dsh_/);
    await page.locator("tr[data-share]").first().waitFor();
    await shot(page, "dashboard-edit");
  });

  // Someone with the link, not logged in.
  await withPage("dashboard-shared", {}, async ({ page }) => {
    await page.goto(link);
    await page.locator("h1", { hasText: "Plant floor" }).waitFor();
    await page.locator(".shared-note", { hasText: /Read-only/ }).waitFor();
    assert.equal(await page.locator(".dash-grid .widget").count(), 6);
    await page.locator(".widget[data-widget=value] .figure").filter({ hasText: /\d/ }).waitFor();
    await page.locator(".widget[data-widget=chart] canvas").first().waitFor();
    // No edit control, no navigation, nothing to press.
    assert.equal(await page.locator("main button").count(), 0);
    assert.equal(await page.locator("select, input, textarea").count(), 0);
    assert.ok(await page.locator("#bar").isHidden());
    await shot(page, "dashboard-shared");
    // The share token opens this dashboard and writes nothing.
    const shareToken = link.split("#/shared/")[1];
    const write = await page.evaluate(async ([id, t]) => {
      const r = await fetch("/api/v1/dashboards/" + encodeURIComponent(id), {
        method: "PUT", headers: { Authorization: "Bearer " + t, "Content-Type": "application/json" },
        body: JSON.stringify({ name: "hacked" }),
      });
      return r.status;
    }, [dashId, shareToken]);
    assert.equal(write, 401);
    // Revoked: the link stops working.
    const shares = await apiAs(token, "GET", "/dashboards/" + encodeURIComponent(dashId) + "/shares");
    await apiAs(token, "DELETE", "/dashboards/" + encodeURIComponent(dashId) + "/shares/" + encodeURIComponent(shares.items[0].id));
    await page.reload();
    await page.locator("h1", { hasText: "This link no longer works" }).waitFor();
  });
  const still = await apiAs(token, "GET", "/dashboards/" + encodeURIComponent(dashId));
  assert.equal(still.name, "Plant floor");

  // The default dashboard of a device profile: a widget that names no
  // device shows the device whose page opened it.
  await withPage("dashboard-profile", {}, async ({ page }) => {
    await loggedIn(page);
    const machine = (await apiAs(token, "GET", "/devices?group=factory&limit=1")).items[0];
    assert.ok(machine.profile, "demo machines have a profile");
    await page.goto(base + "/#/dashboards/" + encodeURIComponent(dashId) + "?edit=1");
    await page.fill("input[name=dashboard-profile]", machine.profile);
    await page.selectOption("select[name=widget-type]", "value");
    await page.fill(".widget-form [name=widget-title]", "This machine");
    await page.fill(".widget-form [name=widget-metric]", "temperature");
    await page.click("button[name=add-widget]");
    await page.click("button[name=save]");
    await page.locator("button[name=save]", { hasText: "Saved" }).waitFor();
    await page.goto(base + "/#/devices/" + encodeURIComponent(machine.id));
    await page.click("td.profile-dashboard a");
    await page.waitForURL(new RegExp("device=" + encodeURIComponent(machine.id)));
    await page.locator("h1", { hasText: machine.id }).waitFor();
    const card = page.locator(".widget[data-widget=value]", { hasText: "This machine" });
    await card.locator(".figure").filter({ hasText: /\d/ }).waitFor();
  });
});

test("the overview charts the last hour; every page reads in dark mode and at a phone's width", async () => {
  await withPage("overview", {}, async ({ page }) => {
    await loggedIn(page);
    await page.goto(base + "/#/");
    await page.locator(".chart-box[data-chart=traffic] canvas").waitFor();
    await page.locator(".chart-box[data-chart=connections] canvas").waitFor();
    await page.locator(".chart-box[data-chart=alarms] canvas").waitFor();
    await page.waitForFunction(() => Number(document.querySelector(".chart-box[data-chart=traffic]").dataset.points) >= 1);
    await page.locator("tr[data-talker]").first().waitFor();
    // Storage and rule health: the demo's store has data and its rules run.
    await page.locator(".card[data-health=disk]").waitFor();
    const rulesCard = await page.locator(".card[data-health=rules] .figure").textContent();
    assert.match(rulesCard, /^\d+ of \d+$/, rulesCard);
    // Times are in the operator's zone, named in the bar.
    assert.ok((await page.locator("#zone").textContent()).length > 0);
    await shot(page, "overview");
    // Rules: counters as a table with rates.
    await page.click("#nav a[href='#/rules']");
    await page.locator("main table td[data-counter=received]").first().waitFor();
    await page.locator("main table td[data-counter=received] .small").first().waitFor({ timeout: 15_000 });
    await shot(page, "rules");

    // The other pages, photographed at 1280×800.
    for (const [name, hash, ready] of [
      ["devices", "#/devices", "main table"],
      ["settings", "#/settings", "main h1"],
      ["reports", "#/reports", "main h1"],
      ["firmware", "#/ota", "main table"],
      ["audit", "#/audit", "main table"],
      ["security", "#/security", "main h1"],
      ["cluster", "#/cluster", "main p"],
    ]) {
      await page.goto(base + "/" + hash);
      await page.locator(ready).first().waitFor();
      await shot(page, name);
    }
    // The demo is one node: the cluster page says so (the three-node case
    // is tested against the API in the cluster tests).
    await page.goto(base + "/#/cluster");
    await page.getByText("This node runs alone").waitFor();
    await page.goto(base + "/#/");

    // The keyboard reaches the navigation first, and a link opens its page.
    await page.evaluate(() => document.activeElement && document.activeElement.blur());
    await page.keyboard.press("Tab");
    assert.equal(await page.evaluate(() => document.activeElement.closest("header") !== null), true, "Tab starts in the header");
    await page.locator("#nav a[href='#/alarms']").focus();
    await page.keyboard.press("Enter");
    await page.waitForURL(/#\/alarms/);

    // Dark mode: the toggle cycles auto → dark → light, and is remembered.
    await page.click("#nav a[href='#/']");
    const theme = () => page.evaluate(() => [document.documentElement.dataset.themeChoice, document.documentElement.dataset.theme]);
    assert.deepEqual(await theme(), ["auto", "light"]);
    await page.click("#theme");
    assert.deepEqual(await theme(), ["dark", "dark"]);
    const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    assert.equal(bg, "rgb(17, 21, 27)");
    await page.locator(".chart-box[data-chart=traffic] canvas").waitFor();
    await shot(page, "overview-dark");
    await page.click("#nav a[href='#/map']");
    await page.locator("#fleet-map path.bm-land").first().waitFor();
    await shot(page, "map-dark");
    await page.reload();
    await page.locator("#fleet-map path.bm-land").first().waitFor();
    assert.deepEqual(await theme(), ["dark", "dark"]);
    await page.click("#theme");
    assert.deepEqual(await theme(), ["light", "light"]);
    await page.click("#theme");
    assert.deepEqual(await theme(), ["auto", "light"]);
  });

  // The system's preference alone turns the console dark; at a phone's
  // width nothing is wider than the screen, and the keyboard reaches the
  // navigation.
  const phone = { viewport: { width: 390, height: 844 }, colorScheme: "dark", isMobile: true, hasTouch: true };
  await withPage("phone", phone, async ({ page }) => {
    const token = await loggedIn(page);
    const trucks = await apiAs(token, "GET", "/devices?group=truck&limit=1");
    for (const [name, hash, ready] of [
      ["phone-overview", "#/", ".chart-box[data-chart=traffic] canvas"],
      ["phone-devices", "#/devices", "main table"],
      ["phone-device", "#/devices/" + encodeURIComponent(trucks.items[0].id), ".chart-box[data-chart=history] canvas"],
      ["phone-map", "#/map", "#fleet-map path.bm-land"],
      ["phone-alarms", "#/alarms", "main h1"],
    ]) {
      await page.goto(base + "/" + hash);
      await page.locator(ready).first().waitFor();
      const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      assert.equal(bg, "rgb(17, 21, 27)", name + " is dark");
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 1, `${name}: ${overflow}px wider than the screen`);
      await shot(page, name);
    }
  });
});
