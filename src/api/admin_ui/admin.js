// The ComputeTower admin page. Everything goes through the /admin JSON API with the admin key
// kept in this tab's session storage; live updates come from /admin/stream (server-sent
// events, read with fetch so the key travels in a header, never in a URL). Every value from
// the server is put in the page as text, never as markup.
"use strict";

const KEY = "computetower.admin_key";
const MAX_ROWS = 200;
const state = {
  overview: null,
  flows: [],
  traffic: { recent: [], decisions: [], series: {} },
  jobLines: new Map(), // account id → lines of its latest job
  seenLines: new Set(),
  openDiff: null,
  openRaw: new Set(),
  view: "accounts",
};

// ---- small helpers ------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fmtTime(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}
function fmtDate(secs) {
  if (!secs) return "–";
  return new Date(secs * 1000).toLocaleString([], { hour12: false });
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 10000 ? (ms / 1000).toFixed(1) + " s" : ms + " ms";
}
function fmtIn(secs) {
  if (!secs) return "with the browser session";
  const left = secs - Date.now() / 1000;
  if (left <= 0) return "expired " + fmtDate(secs);
  if (left < 3600) return "in " + Math.round(left / 60) + " min";
  if (left < 48 * 3600) return "in " + Math.round(left / 3600) + " h";
  return "in " + Math.round(left / 86400) + " days";
}
function pill(text, kind) {
  return h("span", { class: "pill " + (kind || "") }, text);
}
function throttle(fn, ms) {
  let timer = null, again = false;
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(() => { timer = null; if (again) { again = false; fn(); } }, ms);
  };
}
function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}
function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsText(file);
  });
}

// ---- the key and the API ------------------------------------------------------------------

let asking = null;
function askKey(message) {
  if (asking) return asking;
  const dialog = $("key-dialog");
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  asking = new Promise((resolve) => {
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const input = $("key-input");
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      input.value = ""; // the key lives in session storage only, never in the page
      dialog.close();
      $("sign-out").hidden = false;
      asking = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  return asking;
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { authorization: "Bearer " + key } : {};
}

async function api(method, path, body, raw) {
  for (;;) {
    const headers = authHeaders();
    let payload;
    if (body !== undefined) {
      if (raw) payload = body;
      else { headers["content-type"] = "application/json"; payload = JSON.stringify(body); }
    }
    const response = await fetch(path, { method, headers, body: payload });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY);
      await askKey(data && data.error ? data.error.message : "The key was refused.");
      continue;
    }
    if (!response.ok) {
      const message = data && data.error ? data.error.message : `${method} ${path}: ${response.status}`;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return data;
  }
}

// ---- views --------------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + view;
  }
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === view);
  }
  const load = { accounts: loadOverview, flows: loadFlows, traffic: loadTraffic, sessions: loadSessions }[view];
  if (load) load().catch((e) => showError(e.message));
}

window.addEventListener("hashchange", () => show(location.hash.slice(1) || "accounts"));

// ---- accounts -----------------------------------------------------------------------------

async function loadOverview() {
  state.overview = await api("GET", "/admin/overview");
  renderOverview();
}

function renderOverview() {
  const o = state.overview;
  if (!o) return;
  const store = o.server.store.state === "ok" ? "store ok" : "store failing";
  $("status").textContent = `v${o.server.version} · tiers ${o.server.tiers.join(", ")} · ${store}`;
  $("notices").replaceChildren(...o.notices.map((n) => h("div", { class: "notice" }, n)));
  $("services").replaceChildren(
    ...o.services.map((s) =>
      h("div", { class: "notice", hidden: s.serving },
        h("b", {}, s.name), ": not serving — ", s.why_not || "")));
  $("no-accounts").hidden = o.accounts.length > 0;
  const rows = [];
  for (const entry of o.accounts) {
    rows.push(accountRow(entry));
    const lines = state.jobLines.get(entry.account.id);
    if (lines && lines.length) rows.push(progressRow(entry.account.id, lines));
  }
  $("accounts").replaceChildren(...rows);
}

function sessionCell(entry) {
  const s = entry.session;
  const kinds = { ok: "ok", none: "warn", expired: "warn", rejected: "bad" };
  const label = { ok: "logged in", none: "no session", expired: "expired", rejected: "rejected by the site" };
  return h("td", {},
    pill(label[entry.session_state] || entry.session_state, kinds[entry.session_state]),
    s ? h("div", { class: "hint" }, `${s.source}, ${s.cookies} cookies, expires ${fmtIn(s.expires_at)}`) : null);
}

function accountRow(entry) {
  const a = entry.account;
  const load = entry.load || { active: 0, waiting: 0, queued_total: 0, health: 1, cooling_down_secs: null };
  const busy = Boolean(entry.job);
  const remove = h("button", { class: "danger", onclick: async (e) => {
    if (e.target.dataset.armed !== "1") {
      e.target.dataset.armed = "1";
      e.target.textContent = "Really remove?";
      return;
    }
    await act(() => api("DELETE", `/admin/accounts/${encodeURIComponent(a.id)}`));
  } }, "Remove");
  const enabled = h("input", { type: "checkbox", checked: a.enabled, title: "enabled",
    onchange: (e) => act(() => api("PATCH", `/admin/accounts/${encodeURIComponent(a.id)}`, { enabled: e.target.checked })) });
  const health = Math.round((load.health ?? 1) * 100);
  return h("tr", { dataset: { account: a.id } },
    h("td", {}, h("b", {}, a.service), h("div", { class: "hint mono" }, a.id),
      entry.has_flow ? null : h("div", {}, pill("no flow", "warn"))),
    h("td", {}, h("div", {}, a.url), h("div", { class: "hint" },
      [a.email, a.has_password ? "password set" : null, a.proxy ? "proxy " + a.proxy : null].filter(Boolean).join(" · "))),
    sessionCell(entry),
    h("td", {}, pill(health + " %", health >= 80 ? "ok" : health >= 50 ? "warn" : "bad")),
    h("td", {}, `${load.active} running, ${load.waiting} waiting`,
      h("div", { class: "hint" }, `${load.served || 0} served, ${load.queued_total} queued in all`),
      entry.notice ? h("div", { class: "hint" }, entry.notice) : null),
    h("td", {}, load.cooling_down_secs ? pill(load.cooling_down_secs + " s", "warn") : "–"),
    h("td", {}, entry.last_error
      ? [pill(entry.last_error.outcome, "bad"), h("div", { class: "hint" }, fmtDate(entry.last_error.at)),
         h("div", { class: "hint" }, entry.last_error.detail || "")]
      : "–"),
    h("td", {}, enabled),
    h("td", {}, h("div", { class: "actions" },
      h("button", { disabled: busy, dataset: { action: "login" }, onclick: () => startJob(a.id, "login") }, "Log in"),
      h("button", { class: "primary", disabled: busy, dataset: { action: "learn" }, onclick: () => startJob(a.id, "learn") }, busy ? "Running…" : "Learn"),
      remove)));
}

function progressRow(accountId, lines) {
  const pre = h("pre", { class: "lines" });
  for (const l of lines) {
    const cls = l.state === "failed" ? "failed" : l.state === "done" ? "done" : "";
    const text = `${(l.elapsed_ms / 1000).toFixed(1).padStart(5)} s  ${l.line}`;
    pre.append(h("div", { class: cls }, text,
      l.handoff ? [" ", h("a", { href: l.handoff }, "open the handoff page")] : null));
  }
  return h("tr", { class: "progress", dataset: { progress: accountId } }, h("td", { colspan: 9 }, pre));
}

async function startJob(accountId, kind) {
  showError("");
  state.jobLines.set(accountId, []);
  try {
    const started = api("POST", `/admin/accounts/${encodeURIComponent(accountId)}/${kind}`, {});
    // The job shows as running (and its lines arrive on the stream) while the call waits.
    setTimeout(() => loadOverview().catch(() => {}), 150);
    await started;
  } catch (e) {
    showError(`${kind} failed: ${e.message}`);
  }
  await loadOverview().catch(() => {});
  if (kind === "learn") loadFlows().catch(() => {});
}

async function act(call) {
  showError("");
  try { await call(); } catch (e) { showError(e.message); }
  await loadOverview().catch(() => {});
}

$("add-account").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.target;
  const body = {};
  for (const name of ["url", "name", "email", "password"]) {
    const value = form.elements[name].value.trim();
    if (value) body[name] = value;
  }
  const file = form.elements.cookies.files[0];
  try {
    if (file) body.cookies = await readFile(file);
    await api("POST", "/admin/accounts", body);
    form.reset(); // the password and the cookies leave the page
    showError("");
  } catch (err) {
    showError("Could not add the account: " + err.message);
  }
  await loadOverview().catch(() => {});
});

// ---- job lines ----------------------------------------------------------------------------

function addJobLine(line) {
  const key = `${line.job}|${line.at_ms}|${line.line}`;
  if (state.seenLines.has(key)) return;
  state.seenLines.add(key);
  let lines = state.jobLines.get(line.account_id) || [];
  if (lines.length && lines[lines.length - 1].job !== line.job) lines = [];
  lines.push(line);
  state.jobLines.set(line.account_id, lines);
  if (state.view === "accounts") {
    const row = document.querySelector(`tr[data-progress="${CSS.escape(line.account_id)}"]`);
    const fresh = progressRow(line.account_id, lines);
    if (row) row.replaceWith(fresh);
    else {
      const account = document.querySelector(`tr[data-account="${CSS.escape(line.account_id)}"]`);
      if (account) account.after(fresh);
    }
  }
  if (line.state !== "running") {
    loadOverview().catch(() => {});
    if (line.kind === "learn") loadFlows().catch(() => {});
  }
  if (line.handoff && state.view === "sessions") loadSessions().catch(() => {});
}

async function loadJobs() {
  const jobs = await api("GET", "/admin/jobs");
  for (const line of jobs.lines) addJobLine(line);
}

// ---- flows --------------------------------------------------------------------------------

async function loadFlows() {
  const list = await api("GET", "/admin/flows?all=true");
  state.flows = list.data;
  renderFlows();
}

function flowJson(flow) {
  const copy = Object.assign({}, flow);
  for (const k of ["active", "created_at", "tier_floor", "findings"]) delete copy[k];
  return JSON.stringify(copy, null, 2);
}

function renderFlows() {
  const byService = new Map();
  for (const f of state.flows) {
    if (!byService.has(f.service)) byService.set(f.service, []);
    byService.get(f.service).push(f);
  }
  const cards = [];
  for (const [service, versions] of byService) {
    versions.sort((a, b) => b.version - a.version);
    const active = versions.find((v) => v.active) || versions[0];
    cards.push(flowCard(service, active, versions.filter((v) => v !== active)));
  }
  $("flows").replaceChildren(
    cards.length ? h("div", { class: "cards" }, cards)
      : h("p", { class: "muted" }, "No flow yet: learn an account (Accounts → Learn) or import a flow file."));
}

function describeExtract(rule) {
  if (typeof rule === "string") return rule;
  if (rule.regex) return "regex " + rule.regex;
  if (rule.header) return "header " + rule.header;
  return JSON.stringify(rule);
}

function describeDecoder(r) {
  let out = `${r.transport}, text at ${r.text.path || "(the event)"} (${r.text.mode})`;
  if (r.text.event) out += `, events named ${r.text.event}`;
  if (r.reasoning) {
    if (r.reasoning.field) out += `; reasoning at ${r.reasoning.field.path}`;
    else if (r.reasoning.flag) out += `; reasoning where ${r.reasoning.flag.path} = ${JSON.stringify(r.reasoning.flag.equals)}`;
    else if (r.reasoning.markup) out += `; reasoning inside ${r.reasoning.markup.open}`;
  }
  return out;
}

function flowCard(service, flow, older) {
  const req = flow.request;
  const replay = flow.replay || {};
  const stats = flow.stats || {};
  const findings = flow.findings;
  const headers = Object.entries(req.headers || {}).map(([k, v]) => `${k}: ${v}`);
  const verified = replay.needs_browser
    ? pill("needs the browser" + (replay.min_tier ? ` (tier ${replay.min_tier})` : ""), "warn")
    : stats.tested ? pill("verified", "ok") : pill("not verified", "warn");
  const dl = h("dl", {},
    h("dt", {}, "Chat call"), h("dd", { class: "mono" }, `${req.method} ${req.url}`,
      headers.length ? h("div", { class: "hint headers" }, headers.join("\n")) : null),
    h("dt", {}, "Preflights"), h("dd", {}, (flow.preflight || []).length
      ? (flow.preflight).map((p) => h("div", { class: "mono" }, `${p.method || "POST"} ${p.url}`,
          Object.keys(p.extract || {}).length
            ? " → " + Object.entries(p.extract).map(([k, v]) => `${k} (${describeExtract(v)})`).join(", ") : ""))
      : "none"),
    h("dt", {}, "Uploads"), h("dd", {}, flow.upload
      ? [
          ...flow.upload.steps.map((p) => h("div", { class: "mono" },
            `${p.method || "POST"} ${p.url}` + (p.body_kind === "multipart" ? " (multipart)" : p.body_kind === "file" ? " (the file's bytes)" : "")
            + (Object.keys(p.extract || {}).length ? " → " + Object.keys(p.extract).join(", ") : ""))),
          h("div", { class: "hint" }, `named at ${flow.upload.attach || "/"}${flow.upload.single ? " (one file)" : " (a list)"}`
            + (flow.upload.accept ? `; accepts ${flow.upload.accept}` : "")),
        ]
      : "none: the chat page had no attach control when learned"),
    h("dt", {}, "Slots"), h("dd", { class: "mono" }, Object.keys(req.slots || {}).length
      ? Object.entries(req.slots).map(([k, v]) => h("div", {}, `${k} ← ${v}`)) : "none"),
    h("dt", {}, "Decoder"), h("dd", {}, describeDecoder(flow.response)),
    h("dt", {}, "Tier floor"), h("dd", {}, flow.tier_floor
      ? `tier ${flow.tier_floor.tier}; next try of a lower tier in ${flow.tier_floor.next_probe_secs} s`
      : replay.needs_browser ? `starts at tier ${replay.min_tier || 2} (the flow needs the browser)` : "none: tier 1 first"),
    h("dt", {}, "Stats"), h("dd", {}, [
      stats.tested ? "tested" : "untested",
      stats.success_rate !== undefined ? `success ${Math.round(stats.success_rate * 100)} %` : null,
      stats.p50_ms !== undefined ? `p50 ${stats.p50_ms} ms` : null,
      stats.p95_ms !== undefined ? `p95 ${stats.p95_ms} ms` : null,
      stats.last_tested_at ? `last tested ${fmtDate(stats.last_tested_at)}` : null,
    ].filter(Boolean).join(" · ")),
    h("dt", {}, "Verification"), h("dd", {},
      replay.reason ? h("div", {}, replay.reason) : null,
      findings ? [
        h("div", {}, findings.verified
          ? `direct replay answered, first token after ${findings.first_token_ms ?? "?"} ms`
          : `direct replay failed: ${findings.verification_failure || "no text"}`),
        ...(findings.suspicious || []).map((s) => h("div", { class: "hint" }, "suspicious: " + s)),
        ...(findings.notes || []).map((n) => h("div", { class: "hint" }, "note: " + n)),
      ] : (!replay.reason ? (stats.tested ? "verified by one direct replay" : "not verified on this server") : null)));
  const raw = state.openRaw.has(flow.id)
    ? h("pre", { class: "json", dataset: { raw: flow.id } }, flowJson(flow)) : null;
  const versions = older.length ? h("div", {},
    h("h4", {}, "Earlier versions"),
    ...older.map((v) => h("div", { class: "row" },
      h("span", { class: "mono" }, `v${v.version} · ${v.id} · ${fmtDate(v.created_at)}`),
      h("button", { dataset: { diff: v.id }, onclick: () => {
        state.openDiff = state.openDiff === v.id ? null : v.id;
        renderFlows();
      } }, state.openDiff === v.id ? "Hide diff" : "Diff against active")))) : null;
  const diffOf = older.find((v) => v.id === state.openDiff);
  return h("div", { class: "card", dataset: { service, flow: flow.id } },
    h("h3", {}, service, pill("v" + flow.version), verified, h("span", { class: "hint mono" }, flow.id)),
    dl,
    h("div", { class: "buttons" },
      h("button", { onclick: () => {
        if (state.openRaw.has(flow.id)) state.openRaw.delete(flow.id); else state.openRaw.add(flow.id);
        renderFlows();
      } }, raw ? "Hide JSON" : "Raw JSON"),
      h("button", { onclick: () => download(`${service}.json`, flowJson(flow) + "\n") }, "Export")),
    raw, versions,
    diffOf ? diffView(flowJson(diffOf), flowJson(flow), diffOf.version, flow.version) : null);
}

// A line diff (longest common subsequence), old → active.
function diffLines(a, b) {
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { out.push(["same", a[i]]); i++; j++; }
    else if (lcs[i + 1][j] >= lcs[i][j + 1]) out.push(["del", a[i++]]);
    else out.push(["add", b[j++]]);
  }
  while (i < n) out.push(["del", a[i++]]);
  while (j < m) out.push(["add", b[j++]]);
  return out;
}

function diffView(older, active, from, to) {
  const lines = diffLines(older.split("\n"), active.split("\n"));
  const changed = lines.filter(([kind]) => kind !== "same").length;
  return h("div", { class: "diff-box" },
    h("h4", {}, `v${from} → v${to} (active): ${changed} lines differ`),
    h("div", { class: "diff", dataset: { diffFrom: String(from) } }, withContext(lines, 3)));
}

// Changed lines with `context` unchanged lines around them; longer unchanged runs fold.
function withContext(lines, context) {
  const near = lines.map(() => false);
  lines.forEach(([kind], i) => {
    if (kind === "same") return;
    for (let j = Math.max(0, i - context); j <= Math.min(lines.length - 1, i + context); j++) near[j] = true;
  });
  const out = [];
  let folded = 0;
  lines.forEach(([kind, text], i) => {
    if (!near[i]) { folded++; return; }
    if (folded) { out.push(h("div", { class: "gap" }, `  … ${folded} unchanged lines`)); folded = 0; }
    out.push(h("div", { class: kind }, (kind === "add" ? "+ " : kind === "del" ? "- " : "  ") + text));
  });
  if (folded) out.push(h("div", { class: "gap" }, `  … ${folded} unchanged lines`));
  return out;
}

$("import-flow").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.target;
  const file = form.elements.file.files[0];
  if (!file) return;
  try {
    const text = await readFile(file);
    const service = form.elements.service.value.trim();
    const path = "/admin/flows" + (service ? "?service=" + encodeURIComponent(service) : "");
    await api("POST", path, text, true);
    form.reset();
    showError("");
  } catch (err) {
    showError("Could not import the flow: " + err.message);
  }
  await loadFlows().catch(() => {});
});

// ---- live traffic -------------------------------------------------------------------------

async function loadTraffic() {
  const t = await api("GET", "/admin/traffic?minutes=60");
  state.traffic = t;
  $("traffic").replaceChildren(...t.recent.map((r) => trafficRow(Object.assign({ at_ms: r.created_at * 1000 }, r), false)));
  $("decisions").replaceChildren(...t.decisions.map((d) => decisionRow(d, false)));
  renderCharts();
}

const refreshSeries = throttle(async () => {
  try {
    const t = await api("GET", "/admin/traffic?minutes=60&limit=1");
    state.traffic.series = t.series;
    renderCharts();
  } catch (_) { /* the next event tries again */ }
}, 5000);

function outcomeKind(outcome) {
  return outcome === "ok" ? "ok" : outcome === "cancelled" ? "warn" : "bad";
}

function trafficRow(r, live) {
  return h("tr", { class: live ? "fresh" : null, dataset: { request: r.request_id, live: live ? "1" : "0" } },
    h("td", {}, fmtTime(r.at_ms)),
    h("td", {}, r.service),
    h("td", { class: "mono" }, r.account_id || "–"),
    h("td", {}, r.tier ? "tier " + r.tier : "–"),
    h("td", {}, fmtMs(r.ttft_ms)),
    h("td", {}, fmtMs(r.latency_ms)),
    h("td", {}, fmtMs(r.queue_ms)),
    h("td", { title: r.detail || "" }, pill(r.outcome, outcomeKind(r.outcome)),
      r.detail ? h("div", { class: "hint" }, r.detail) : null));
}

function decisionRow(d, live) {
  return h("tr", { class: live ? "fresh" : null, dataset: { request: d.request_id } },
    h("td", {}, fmtDate(d.created_at)),
    h("td", {}, d.service),
    h("td", { class: "mono" }, d.account_id || "–"),
    h("td", {}, d.failure),
    h("td", {}, pill(d.action, d.action === "fail" ? "bad" : "warn")));
}

function prepend(tbody, row) {
  tbody.prepend(row);
  while (tbody.children.length > MAX_ROWS) tbody.lastElementChild.remove();
}

function renderCharts() {
  const series = state.traffic.series || {};
  const now = Math.floor(Date.now() / 60000);
  const charts = Object.entries(series).map(([service, points]) => {
    const byMinute = new Map(points.map((p) => [p.minute, p]));
    const minutes = Array.from({ length: 60 }, (_, i) => now - 59 + i);
    const reqs = minutes.map((m) => (byMinute.get(m) || {}).requests || 0);
    const p50 = minutes.map((m) => (byMinute.get(m) || {}).p50_ttft_ms ?? null);
    const p95 = minutes.map((m) => (byMinute.get(m) || {}).p95_ttft_ms ?? null);
    const total = reqs.reduce((a, b) => a + b, 0);
    const last = (xs) => { for (let i = xs.length - 1; i >= 0; i--) if (xs[i] !== null) return xs[i]; return null; };
    return h("div", { class: "chart", dataset: { service } },
      h("h3", {}, service),
      h("div", { class: "legend" }, `requests per minute (top ${Math.max(1, ...reqs)}/min): ${total} requests in the last hour, ${reqs[59]} this minute`),
      bars(reqs),
      h("div", { class: "legend" }, `time to first token (top ${fmtMs(Math.max(0, ...p95.filter((v) => v !== null)))}): p50 ${fmtMs(last(p50))}, p95 ${fmtMs(last(p95))} (latest minute)`),
      lines(p50, p95),
      h("div", { class: "legend" }, "last 60 minutes · green p50, orange p95"));
  });
  $("charts").replaceChildren(...(charts.length ? charts
    : [h("p", { class: "muted" }, "No requests in the last hour.")]));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}
function bars(values) {
  const max = Math.max(1, ...values);
  const root = svg("svg", { viewBox: "0 0 600 90", preserveAspectRatio: "none", role: "img", "aria-label": "requests per minute" });
  values.forEach((v, i) => {
    const height = (v / max) * 80;
    root.append(svg("rect", { class: "bar", x: i * 10 + 1, y: 88 - height, width: 8, height }));
  });
  return root;
}
function lines(p50, p95) {
  const max = Math.max(1, ...p95.filter((v) => v !== null), ...p50.filter((v) => v !== null));
  const root = svg("svg", { viewBox: "0 0 600 90", preserveAspectRatio: "none", role: "img", "aria-label": "time to first token" });
  for (const [values, cls] of [[p50, "p50"], [p95, "p95"]]) {
    const pts = values.map((v, i) => (v === null ? null : [i * 10 + 5, 88 - (v / max) * 80]));
    const drawn = pts.filter(Boolean);
    if (drawn.length > 1) root.append(svg("polyline", { class: cls, points: drawn.map((p) => p.join(",")).join(" ") }));
    for (const [x, y] of drawn) root.append(svg("rect", { class: cls === "p50" ? "dot50" : "dot95", x: x - 3, y: y - 1.5, width: 6, height: 3 }));
  }
  return root;
}

// ---- sessions -----------------------------------------------------------------------------

async function loadSessions() {
  const s = await api("GET", "/admin/sessions");
  $("live-sessions").replaceChildren(...(s.live.length ? s.live.map((l) => h("tr", { dataset: { live: l.id } },
    h("td", { class: "mono" }, l.id),
    h("td", { class: "mono" }, l.account_id),
    h("td", {}, pill(l.state === "waiting_for_human" ? "waiting for you" : l.state,
      l.state === "waiting_for_human" ? "warn" : "")),
    h("td", {}, l.url),
    h("td", {}, fmtDate(l.since)),
    h("td", {}, h("a", { href: `/admin/sessions/${encodeURIComponent(l.id)}` }, "Open handoff page"))))
    : [h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No browser session in progress."))]));
  $("stored-sessions").replaceChildren(...s.data.slice().reverse().map((x) => h("tr", {},
    h("td", { class: "mono" }, x.id),
    h("td", { class: "mono" }, x.account_id),
    h("td", {}, x.source),
    h("td", {}, x.authenticated ? pill("yes", "ok") : pill("rejected", "bad")),
    h("td", { class: "mono" }, x.cookies.join(", ") || "–"),
    h("td", {}, fmtDate(x.created_at)),
    h("td", {}, fmtIn(x.expires_at)))));
}

setInterval(() => {
  if (state.view === "sessions" && !document.hidden) loadSessions().catch(() => {});
}, 3000);

// ---- the live stream ----------------------------------------------------------------------

function onEvent(name, data) {
  if (name === "request") {
    prepend($("traffic"), trafficRow(data, true));
    refreshSeries();
    if (state.view === "accounts") refreshOverview();
  } else if (name === "decision") {
    prepend($("decisions"), decisionRow(data, true));
  } else if (name === "job") {
    addJobLine(data);
  }
}

const refreshOverview = throttle(() => loadOverview().catch(() => {}), 2000);

function setStream(on) {
  const el = $("stream-state");
  el.textContent = on ? "live" : "offline";
  el.classList.toggle("ok", on);
  document.body.dataset.stream = on ? "live" : "offline";
}

async function stream() {
  for (;;) {
    try {
      const response = await fetch("/admin/stream", { headers: authHeaders() });
      if (response.status === 401 || response.status === 403) {
        await askKey("The key was refused.");
        continue;
      }
      if (!response.ok || !response.body) throw new Error("stream " + response.status);
      setStream(true);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (!data.length) continue;
          try { onEvent(name, JSON.parse(data.join("\n"))); } catch (_) { /* a malformed event is skipped */ }
        }
      }
    } catch (_) { /* reconnect below */ }
    setStream(false);
    await sleep(2000);
  }
}

// ---- start --------------------------------------------------------------------------------

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  location.reload();
});
$("sign-out").hidden = !sessionStorage.getItem(KEY);

(async () => {
  try {
    await loadOverview();
  } catch (e) {
    showError(e.message);
  }
  show(location.hash.slice(1) || "accounts");
  loadJobs().catch(() => {});
  stream();
})();
