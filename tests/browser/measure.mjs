// Measures the dashboard with a large fleet (run by the benchmark in tests/tests/gitops.rs):
// the page's load time (navigation to the first full render, with the live stream open) and
// what its live updates cost during a rollout (server-sent event bytes, page fetches).
// Prints `RESULT {json}`. Environment: DASH_URL, DASH_STORES.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = process.env.DASH_URL, stores = Number(process.env.DASH_STORES);
const lines = createInterface({ input: process.stdin });
const next = () => new Promise((res) => lines.once("line", res));
const ctx = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "roost-chromium-")), {
  executablePath: "/usr/bin/chromium", headless: true, viewport: { width: 1400, height: 1000 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await ctx.newPage();
  const loads = [];
  for (let i = 0; i < 3; i++) {
    await page.goto(url, { waitUntil: "load" });
    await page.waitForSelector("body[data-ready='1']", { timeout: 120_000 });
    await page.waitForFunction((n) => Number(document.querySelector("#summary [data-k='stores']").textContent) === n, stores);
    loads.push(await page.evaluate(() => window.roostDash.firstRender - performance.timeOrigin));
  }
  await page.waitForFunction(() => window.roostDash.connected);
  const before = await page.evaluate(() => ({ b: window.roostDash.streamBytes, u: window.roostDash.updates, f: window.roostDash.pageFetches, t: performance.now() }));
  console.log("STEP rollout");
  await next();
  // Let the last tick's messages arrive.
  await page.waitForFunction(() => document.querySelector(".chip.ph-Converged")?.textContent.endsWith(" " + document.querySelector("#summary [data-k='stores']").textContent), null, { timeout: 120_000 });
  const after = await page.evaluate(() => ({
    b: window.roostDash.streamBytes, u: window.roostDash.updates, f: window.roostDash.pageFetches, t: performance.now(),
    rowsBytes: performance.getEntriesByType("resource").filter((e) => e.name.includes("/api/v1/rows")).reduce((s, e) => s + e.encodedBodySize, 0),
  }));
  const secs = (after.t - before.t) / 1000;
  console.log("RESULT " + JSON.stringify({
    stores, load_ms: loads.map(Math.round), rollout_s: +secs.toFixed(1),
    stream_bytes: after.b - before.b, stream_bytes_per_s: Math.round((after.b - before.b) / secs),
    stream_messages: after.u - before.u, page_fetches: after.f - before.f,
    rows_fetch_bytes_total: after.rowsBytes,
  }));
} finally {
  await ctx.close();
  lines.close();
}
