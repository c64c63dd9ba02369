// Drives Debian's chromium (playwright-core) against the roost dashboard, step by step with
// the Rust test that runs it (tests/tests/gitops.rs): it prints `STEP name` when it needs the
// test to act and reads one line from stdin when the test has acted. Every check waits for a
// positive marker in the page, never for a fixed time. Exits non-zero on any failure.
//
// Environment: DASH_URL, DASH_TOKEN, DASH_STORES, DASH_DEPLOYMENT, DASH_REV1 (short),
// DASH_OUT (directory for screenshots), DASH_SCREENSHOT (optional extra copy).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdtempSync, copyFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const url = env("DASH_URL"), token = env("DASH_TOKEN"), dep = env("DASH_DEPLOYMENT");
const stores = Number(env("DASH_STORES")), out = env("DASH_OUT");
const WAIT = 180_000;

const lines = createInterface({ input: process.stdin });
const queue = [];
let waiter = null;
lines.on("line", (l) => { if (waiter) { const w = waiter; waiter = null; w(l); } else queue.push(l); });
function step(name) {
  console.log("STEP " + name);
  return new Promise((res) => { if (queue.length) res(queue.shift()); else waiter = res; });
}
const log = (m) => console.log("dashboard: " + m);

// A fresh profile (playwright passes it as --user-data-dir).
const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "roost-chromium-")), {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let page;
try {
  page = await browser.newPage();
  page.on("pageerror", (e) => log("page error: " + e.message));
  let navigations = 0;
  page.on("framenavigated", (f) => { if (f === page.mainFrame()) navigations++; });
  await page.goto(url, { waitUntil: "load" });
  await page.waitForSelector("body[data-ready='1']", { timeout: WAIT });
  const loadedAt = await page.evaluate(() => window.roostDash.loadedAt);
  await page.waitForFunction(() => window.roostDash.connected, null, { timeout: WAIT });

  // 1. Every store converges on the first revision (the live stream fills the table).
  const rowsOn = (short) => page.waitForFunction(
    ([n, short, dep]) => {
      const rows = [...document.querySelectorAll(`#rows tbody tr[data-deployment='${dep}']`)];
      return rows.length === n && rows.every((r) => r.dataset.shown === "Converged" &&
        r.querySelector("[data-k='applied']")?.textContent === short &&
        r.querySelector(".marker")?.textContent === "=");
    }, [stores, short, dep], { timeout: WAIT, polling: 200 });
  await rowsOn(env("DASH_REV1"));
  log(`${stores} stores converged on ${env("DASH_REV1")}`);
  await page.screenshot({ path: join(out, "1-converged.png"), fullPage: true });

  // 2. A new revision rolls out: the table follows without a reload.
  const rev2 = (await step("commit")).trim();
  await rowsOn(rev2);
  const same = await page.evaluate(() => window.roostDash.loadedAt);
  if (same !== loadedAt || navigations !== 1) {
    throw new Error(`the page reloaded (navigations ${navigations})`);
  }
  const updates = await page.evaluate(() => window.roostDash.updates);
  log(`${stores} stores converged on ${rev2} without a reload (${updates} live updates)`);

  // 3. A store whose bridge stopped shows offline and stale, never Converged.
  const gone = (await step("stop-bridge")).trim();
  await page.waitForFunction(
    ([s, dep]) => {
      const r = document.querySelector(`#rows tbody tr[data-store='${s}'][data-deployment='${dep}']`);
      return r && r.dataset.presence === "offline" && r.dataset.shown === "Stale" &&
        Number(document.querySelector("#summary [data-k='offline']").textContent) >= 1 &&
        Number(document.querySelector("#summary [data-k='stale']").textContent) >= 1;
    }, [gone, dep], { timeout: WAIT, polling: 200 });
  log(`${gone} shows offline and stale`);

  // 4. Pause a running plan: a confirmation, the token asked once (kept in sessionStorage).
  await step("running-plan");
  const card = `#plans .plan[data-deployment='${dep}']`;
  await page.waitForSelector(`${card}[data-status='running'] button[data-action='pause']:not([disabled])`, { timeout: WAIT });
  const dialogs = [];
  page.on("dialog", async (d) => {
    dialogs.push(d.type());
    if (d.type() === "prompt") await d.accept(token);
    else await d.accept();
  });
  await page.click(`${card} button[data-action='pause']`);
  await page.waitForSelector(`${card}[data-status='paused']`, { timeout: WAIT });
  if (dialogs[0] !== "confirm" || !dialogs.includes("prompt")) {
    throw new Error("expected a confirmation and a token prompt, saw " + dialogs.join(","));
  }
  const kept = await page.evaluate(() => sessionStorage.getItem("roost-token"));
  if (kept !== token) throw new Error("the token is not kept in sessionStorage");
  log("plan paused from the page (" + dialogs.join(", ") + ")");
  const shot = join(out, "dashboard.png");
  await page.screenshot({ path: shot, fullPage: true });
  if (process.env.DASH_SCREENSHOT) copyFileSync(shot, process.env.DASH_SCREENSHOT);
  console.log("SCREENSHOT " + shot);
  console.log("DONE");
} catch (e) {
  console.log("FAILED " + (e && e.stack ? e.stack : e));
  if (page) {
    try { await page.screenshot({ path: join(out, "failure.png"), fullPage: true }); } catch (_) { /* closed */ }
  }
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
