// roost fleet dashboard: plain JS, no dependencies. State comes from the JSON API
// (/api/v1/...), changes from the server-sent event stream (/api/v1/stream); nothing reloads.
"use strict";

const $ = (s, el = document) => el.querySelector(s);
const dash = (window.roostDash = {
  loadedAt: Date.now(), updates: 0, pageFetches: 0, streamBytes: 0, connected: false,
});
const state = { rows: [], total: 0, pages: 1, page: 1, plans: [], deployments: new Set() };

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v;
    else e[k] = v;
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k);
  return e;
}

function age(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

// ---- summary
function renderSummary(s) {
  for (const k of ["stores", "online", "offline", "stale", "drifted", "with_gaps"]) {
    const b = $(`#summary [data-k="${k}"]`);
    if (b) b.textContent = s[k];
  }
  const ph = $("#phases");
  ph.replaceChildren(
    ...Object.entries(s.by_phase).map(([p, n]) =>
      el("span", { class: "chip ph-" + p, "data-phase": p }, `${p} ${n}`)
    )
  );
  // Failed notification deliveries (given up, or being retried), with the newest's error.
  const n = s.notifications, nf = $("#notify-failing");
  const bad = n ? n.failed + n.retrying : 0;
  nf.hidden = !bad;
  if (bad) {
    const last = n.failing[0];
    nf.textContent = `notifications: ${n.failed} failed, ${n.retrying} being retried` +
      (last ? ` (${last.sink}: ${last.last_error})` : "");
  }
}

// ---- plans
function renderPlans(doc) {
  state.plans = doc.plans;
  const box = $("#plans");
  if (!doc.plans.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no plans"));
    return;
  }
  box.replaceChildren(...doc.plans.map(planCard));
  for (const p of doc.plans) addDeployment(p.deployment);
}

function planCard(p) {
  const btn = (action, enabled) =>
    el("button", {
      type: "button", "data-action": action, disabled: !enabled,
      onclick: () => planAction(p.deployment, action),
    }, action);
  const waves = el("table", {},
    el("tr", {}, ...["wave", "target", "state", "progress", "converged", "failed", "deferred", "waiting", "pending", "gate"].map((h) => el("th", {}, h))),
    ...p.waves.map((w) => {
      const pct = w.stores ? Math.round((100 * w.converged) / w.stores) : 0;
      return el("tr", { "data-wave": w.name, "data-state": w.state },
        el("td", {}, w.name), el("td", {}, w.target), el("td", {}, w.state),
        el("td", {}, el("span", { class: "bar", title: pct + " %" }, el("i", { style: "" })), ` ${w.converged}/${w.stores}`),
        el("td", {}, String(w.converged)), el("td", {}, String(w.failed)),
        el("td", {}, String(w.deferred)), el("td", { "data-k": "waiting" }, String(w.waiting || 0)),
        el("td", {}, String(w.pending)),
        el("td", { class: "muted" }, `${w.converged_pct} %` + (w.soak_s ? `, soak ${w.soak_s} s` : "")));
    }));
  // Widths set after creation (no inline style strings from data).
  waves.querySelectorAll(".bar i").forEach((i, n) => {
    const w = p.waves[n];
    i.style.width = (w.stores ? (100 * w.converged) / w.stores : 0) + "%";
  });
  const running = p.status === "running", paused = p.status === "paused";
  return el("div", { class: "plan", "data-deployment": p.deployment, "data-status": p.status },
    el("h3", {},
      el("span", {}, p.deployment),
      el("span", { class: "status status-" + p.status }, p.status),
      el("code", { title: p.revision.revision }, p.revision.short),
      el("span", { class: "sub" }, "from fleet commit " + p.origin.slice(0, 12)),
      el("span", { class: "actions" }, btn("pause", running), btn("resume", paused), btn("abort", running || paused))),
    p.reason ? el("div", { class: "waiting" }, "aborted: " + p.reason) : null,
    p.waiting ? el("div", { class: "waiting", "data-k": "waiting" }, "waiting: " + p.waiting) : null,
    waves,
    p.waits && Object.keys(p.waits).length
      ? el("ul", { class: "waits", "data-k": "waits" },
        ...Object.entries(p.waits).map(([s, why]) => el("li", { "data-store": s }, `${s} waits: ${why}`)))
      : null);
}

function token() {
  let t = sessionStorage.getItem("roost-token");
  if (!t) {
    t = prompt("API token for plan actions (kept in this tab only):");
    if (t) sessionStorage.setItem("roost-token", t.trim());
  }
  return sessionStorage.getItem("roost-token");
}

async function planAction(deployment, action) {
  if (!confirm(`${action} the rollout plan of ${deployment}?`)) return;
  const t = token();
  if (!t) return;
  const r = await fetch(`/api/v1/plans/${encodeURIComponent(deployment)}/${action}`, {
    method: "POST", headers: { Authorization: "Bearer " + t },
  });
  if (r.status === 401 || r.status === 403) sessionStorage.removeItem("roost-token");
  if (!r.ok) {
    let msg = r.status + "";
    try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    alert(`${action} ${deployment}: ${msg}`);
  }
}

$("#token-btn").addEventListener("click", () => {
  sessionStorage.removeItem("roost-token");
  token();
});

// ---- rows
function addDeployment(d) {
  if (state.deployments.has(d)) return;
  state.deployments.add(d);
  const sel = $('#filters [name="deployment"]');
  sel.append(el("option", { value: d }, d));
}

function filters() {
  const f = new FormData($("#filters"));
  const q = new URLSearchParams();
  for (const k of ["deployment", "group", "selector", "phase", "q", "per_page"]) {
    const v = (f.get(k) || "").trim();
    if (v) q.set(k, v);
  }
  if (f.get("stale")) q.set("stale", "true");
  q.set("page", state.page);
  return q;
}

function filtered() {
  const q = filters();
  return ["deployment", "group", "selector", "phase", "q", "stale"].some((k) => q.has(k));
}

function rowEl(r) {
  const d = r.desired;
  const marker = r.marker === "=" ? "eq" : r.marker === ">" ? "ahead" : "";
  return el("tr", {
      "data-store": r.store, "data-deployment": r.deployment, "data-shown": r.shown,
      "data-presence": r.presence, class: r.stale ? "stale" : "",
      title: r.stale_reason || "",
    },
    el("td", {}, r.store, r.groups.length ? el("span", { class: "sub" }, r.groups.join(", ")) : null,
      r.labels ? el("span", { class: "sub labels", "data-k": "labels" },
        Object.entries(r.labels).map(([k, v]) => `${k}=${v}`).join(", ")) : null),
    el("td", {}, r.deployment),
    el("td", { class: "desired" },
      d ? el("code", { title: d.revision, "data-k": "desired" }, d.short) : el("span", { class: "muted" }, "–"),
      d && d.subject ? el("span", { class: "sub" }, d.subject) : null,
      d && d.committed_at ? el("span", { class: "sub", "data-ts": d.committed_at }, age(d.committed_at)) : null,
      d && d.origin ? el("span", { class: "sub", title: d.origin.repo + " " + d.origin.commit }, "fleet " + d.origin.short) : null,
      d ? el("span", { class: "sub" }, d.scope) : null),
    el("td", { class: "marker " + marker }, r.marker),
    el("td", {}, r.applied ? el("code", { title: r.applied.revision, "data-k": "applied" }, r.applied.short) : el("span", { class: "muted" }, "–")),
    el("td", {}, el("span", { class: "chip ph-" + r.shown, title: r.stale ? `reported ${r.phase}; ${r.stale_reason || "stale"}` : r.message }, r.shown),
      r.note && !r.stale ? el("span", { class: "sub", "data-k": "note" }, r.note) : null),
    el("td", {}, r.drift ? "drift" : ""),
    el("td", {}, el("span", { class: "pres-" + r.presence }, r.presence),
      el("span", { class: "sub", "data-ts": r.last_heard || "" }, age(r.last_heard))),
    el("td", {}, r.gaps ? String(r.gaps) : ""));
}

function renderRows() {
  $("#rows tbody").replaceChildren(...state.rows.map(rowEl));
  $("#rows-total").textContent = `(${state.total} rows)`;
  $("#page-info").textContent = `page ${state.page} of ${Math.max(1, state.pages)}`;
  $('#pager [data-go="prev"]').disabled = state.page <= 1;
  $('#pager [data-go="next"]').disabled = state.page >= state.pages;
}

let fetching = null, again = false;
async function fetchRows() {
  if (fetching) { again = true; return fetching; }
  fetching = (async () => {
    try {
      const p = await getJSON("/api/v1/rows?" + filters());
      dash.pageFetches++;
      state.rows = p.rows; state.total = p.total; state.pages = p.pages;
      if (state.page > Math.max(1, p.pages)) { state.page = Math.max(1, p.pages); again = true; }
      for (const r of p.rows) addDeployment(r.deployment);
      renderRows();
    } catch (e) { console.warn(e); }
  })();
  await fetching;
  fetching = null;
  if (again) { again = false; return fetchRows(); }
}

// Page fetches caused by the stream: at most one a second.
let refetchTimer = null;
function scheduleRefetch() {
  if (refetchTimer) return;
  refetchTimer = setTimeout(() => { refetchTimer = null; fetchRows(); }, 1000);
}

function applyRowChanges(u) {
  const key = (s, d) => s + "\u0000" + d;
  const onPage = new Map(state.rows.map((r, i) => [key(r.store, r.deployment), i]));
  let missing = u.truncated || u.removed.length > 0 || u.total !== state.total;
  // Many changed: only their keys came; fetch the page if one of them is on it.
  const whole = new Set(u.changed.map((r) => key(r.store, r.deployment)));
  for (const [s, d] of u.keys) {
    if (!whole.has(key(s, d)) && (onPage.has(key(s, d)) || filtered())) missing = true;
  }
  for (const r of u.changed) {
    addDeployment(r.deployment);
    const i = onPage.get(r.store + "\u0000" + r.deployment);
    if (i === undefined) { missing = true; continue; }
    if (filtered()) { missing = true; }
    state.rows[i] = r;
    const tr = $("#rows tbody").children[i];
    if (tr) tr.replaceWith(rowEl(r));
  }
  if (missing) scheduleRefetch();
}

$("#filters").addEventListener("input", () => { state.page = 1; fetchRows(); });
$("#filters").addEventListener("submit", (e) => e.preventDefault());
$("#pager").addEventListener("click", (e) => {
  const go = e.target.getAttribute && e.target.getAttribute("data-go");
  if (!go) return;
  state.page = Math.max(1, Math.min(state.pages, state.page + (go === "next" ? 1 : -1)));
  fetchRows();
});

// ---- events
function addEvents(list) {
  const ol = $("#events");
  for (const e of list) {
    const ev = e.event || {};
    const d = ev.data || {};
    const ty = (ev.type || "").replace("dev.roost.", "");
    const bad = /rejected|failed|degraded|drift\.detected|overflow/.test(ty);
    ol.prepend(el("li", { class: bad ? "bad" : "", "data-type": ev.type },
      el("span", { class: "t" }, (ev.time || "").replace("T", " ").slice(0, 23)),
      el("b", {}, e.store), " ", el("span", { class: "ty" }, ty), " ",
      ev.subject || "", d.revision ? " " + String(d.revision).slice(0, 12) : "",
      d.reason ? el("span", { class: "sub" }, d.reason) : null,
      d.message ? el("span", { class: "sub" }, d.message) : null));
  }
  while (ol.children.length > 200) ol.lastElementChild.remove();
}

// ---- live stream
function connect() {
  const es = new EventSource("/api/v1/stream");
  const on = (kind, f) => es.addEventListener(kind, (m) => {
    dash.updates++;
    dash.streamBytes += m.data.length;
    try { f(JSON.parse(m.data)); } catch (e) { console.warn(kind, e); }
  });
  es.onopen = () => {
    dash.connected = true;
    const l = $("#live"); l.textContent = "live"; l.className = "live on";
    fetchRows();
  };
  es.onerror = () => {
    dash.connected = false;
    const l = $("#live"); l.textContent = "reconnecting…"; l.className = "live off";
  };
  on("summary", renderSummary);
  on("plans", renderPlans);
  on("rows", applyRowChanges);
  on("events", (u) => addEvents(u.events));
  on("resync", () => { fetchRows(); getJSON("/api/v1/summary").then(renderSummary); getJSON("/api/v1/plans").then(renderPlans); });
}

// Ages move without updates.
setInterval(() => {
  document.querySelectorAll("[data-ts]").forEach((s) => {
    const ts = s.getAttribute("data-ts");
    if (ts) s.textContent = age(ts);
  });
}, 1000);

(async function start() {
  const [summary, plans, events] = await Promise.all([
    getJSON("/api/v1/summary"), getJSON("/api/v1/plans"),
    getJSON("/api/v1/events?order=desc&limit=50"),
  ]);
  renderSummary(summary);
  renderPlans(plans);
  await fetchRows();
  // Newest first from the API; addEvents prepends, so oldest first.
  addEvents(events.events.reverse());
  dash.firstRender = Date.now();
  document.body.setAttribute("data-ready", "1");
  connect();
})();
