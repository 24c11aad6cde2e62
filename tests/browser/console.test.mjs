// Browser tests of the operator console: the real `m2mhub demo` (server,
// simulated fleet, example rules) on loopback, driven in Debian's headless
// Chromium by playwright-core. Run by `.ci/run` after `cargo test` built the
// binary; `M2MHUB_BIN` and `CHROMIUM` override the paths.
//
// What a first-time operator does: log in, find a device, watch a live value
// change, send a command and see the device answer, create a rule with an
// error and then without, acknowledge the alarm it raises; and a viewer sees
// the same pages without any control that changes something.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, createWriteStream, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.M2MHUB_BIN || resolve(here, "../../target/debug/m2mhub");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Generous: the CI machine is small and shared.
const WAIT = 20_000;

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

/// A new page that fails the test on any script error or request to
/// another host (the console must work with no internet).
async function newPage() {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push("page error: " + e.message));
  page.on("console", (m) => { if (m.type() === "error" && !/401|404|422/.test(m.text())) errors.push("console: " + m.text()); });
  page.on("request", (r) => { if (!r.url().startsWith(base)) errors.push("request to another host: " + r.url()); });
  page.setDefaultTimeout(WAIT);
  return { page, context, errors };
}

/// With SCREENSHOT_DIR set, save a screenshot of the page (to look at).
async function shot(page, name) {
  if (process.env.SCREENSHOT_DIR) await page.screenshot({ path: join(process.env.SCREENSHOT_DIR, name + ".png"), fullPage: true });
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

    assert.deepEqual(errors, []);
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
    assert.deepEqual(errors, []);
  } catch (e) {
    await page.screenshot({ path: join(dir, "ota-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
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
    await page.locator("svg.map circle.pin").first().waitFor();
    await page.locator("svg.map polygon.fence").waitFor();
    await page.locator("h1 .livebadge.on").waitFor();
    await shot(page, "map");
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
    assert.deepEqual(errors, []);
  } catch (e) {
    await page.screenshot({ path: join(dir, "viewer-failure.png"), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
  }
});
