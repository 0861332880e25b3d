// The iofilterd console: one page over the host's own API, with the caller's token.
// Everything it shows comes from the API; everything it does is an API call, so the
// host's roles decide what a user may do (the page only greys out what would be refused).
//
// Drawing: each view is rebuilt as fresh nodes and *morphed* into the page (only text
// and attributes that changed are touched), so figures move every second while text
// stays selectable, inputs keep what is typed and open charts stay open. Actions are
// handled by one delegated listener reading data-action, never by per-node closures
// that a morph could leave stale.
"use strict";

const roles = ["read-only", "operator", "admin"];
const healthOrder = { ok: 0, degraded: 1, failed: 2 };
const state = {
  token: null, session: null, vms: [], disks: [], events: [], policies: [], plugins: [], capabilities: null,
  lastUpdate: null, stream: null, hostVersion: "", charts: {}, capabilitiesShown: "",
};

// ---- DOM helpers (text only: names come from plug-ins and users) ----------------------
function el(tag, attributes = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const $ = (selector) => document.querySelector(selector);

// Makes `target`'s children look like `fresh`'s, touching only what differs. Elements
// marked data-keep are the page's own (an open chart panel): left as they are.
function morphChildren(target, fresh) {
  const wanted = [...fresh.childNodes];
  // Keyed children move with their key (a re-sorted list keeps each card, open chart
  // panels and all); the rest are matched by position.
  const keyed = new Map();
  for (const child of target.childNodes) if (child.nodeType === Node.ELEMENT_NODE && child.hasAttribute("data-key")) keyed.set(child.getAttribute("data-key"), child);
  for (let i = 0; i < wanted.length; i++) {
    const want = wanted[i];
    const key = want.nodeType === Node.ELEMENT_NODE ? want.getAttribute("data-key") : null;
    const found = key !== null ? keyed.get(key) : undefined;
    if (found && found.nodeName === want.nodeName) {
      keyed.delete(key);
      if (target.childNodes[i] !== found) target.insertBefore(found, target.childNodes[i] || null);
      morph(found, want);
      continue;
    }
    const have = target.childNodes[i];
    if (!have) { target.append(want); continue; }
    if (!sameKind(have, want)) { target.insertBefore(want, have); continue; }
    morph(have, want);
  }
  while (target.childNodes.length > wanted.length) target.lastChild.remove();
}
function sameKind(a, b) {
  if (a.nodeType !== b.nodeType || a.nodeName !== b.nodeName) return false;
  if (a.nodeType !== Node.ELEMENT_NODE) return true;
  return a.getAttribute("data-key") === b.getAttribute("data-key");
}
function morph(have, want) {
  if (have.nodeType === Node.TEXT_NODE) {
    if (have.data !== want.data) have.data = want.data;
    return;
  }
  if (have.nodeType !== Node.ELEMENT_NODE || have.hasAttribute("data-keep")) return;
  for (const attribute of [...have.attributes]) {
    // An open <details> is the user's choice, not the data's.
    if (!want.hasAttribute(attribute.name) && attribute.name !== "open") have.removeAttribute(attribute.name);
  }
  for (const attribute of [...want.attributes]) {
    if (have.getAttribute(attribute.name) !== attribute.value) have.setAttribute(attribute.name, attribute.value);
  }
  if ("disabled" in want && have.disabled !== want.disabled) have.disabled = want.disabled;
  morphChildren(have, want);
}

function toast(message, isError = false) {
  const box = $("#toast");
  box.textContent = message;
  box.className = "show" + (isError ? " error" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.className = ""), isError ? 6000 : 2500);
}
const may = (needed) => state.session && roles.indexOf(state.session.role) >= roles.indexOf(needed);
// A control the caller's role may not use is shown, disabled, saying why.
function gated(needed, node) {
  node.setAttribute("data-needs", needed);
  if (!may(needed)) {
    node.setAttribute("disabled", "");
    node.setAttribute("title", `needs the ${needed} role (you have ${state.session ? state.session.role : "none"})`);
  }
  return node;
}

// ---- figures, with their units ---------------------------------------------------------
const fmt = {
  number: (value, digits = 0) => (Number.isFinite(value) ? value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits }) : "–"),
  bytes(value) {
    if (!Number.isFinite(value)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
    return `${fmt.number(value, unit && Math.abs(value) < 100 ? 1 : 0)} ${units[unit]}`;
  },
  rate: (value) => `${fmt.number(value, value > 0 && value < 10 ? 1 : 0)}/s`,
  throughput: (value) => `${fmt.bytes(value)}/s`,
  percent: (ratio) => (Number.isFinite(ratio) ? `${fmt.number(ratio * 100, ratio >= 0.9995 || ratio === 0 ? 0 : 1)} %` : "–"),
  ms: (value) => (Number.isFinite(value) ? `${fmt.number(value, value < 1 ? 2 : value < 10 ? 1 : 0)} ms` : "–"),
  duration(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    if (seconds < 1) return `${fmt.number(seconds * 1000, 0)} ms`;
    if (seconds < 90) return `${fmt.number(seconds, seconds < 10 ? 1 : 0)} s`;
    if (seconds < 5400) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${fmt.number(seconds / 3600, 1)} h`;
  },
  time: (date) => date.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" }),
  dateTime: (date) => `${date.toLocaleDateString("en-CA")} ${fmt.time(date)}`,
  // A filter's own statistic, by the convention of its name.
  stat(key, value) {
    if (/ratio|_rate$/.test(key) && value >= 0 && value <= 1) return fmt.percent(value);
    if (/bytes/.test(key)) return fmt.bytes(value);
    if (/_seconds$/.test(key)) return fmt.duration(value);
    return fmt.number(value, Number.isInteger(value) ? 0 : 2);
  },
  statUnit(key) {
    if (/ratio/.test(key)) return "percent";
    if (/bytes/.test(key)) return "bytes";
    if (/_seconds$/.test(key)) return "seconds";
    return "count";
  },
};
const sum = (values) => values.reduce((a, b) => a + (b || 0), 0);
function vmRates(vm) {
  const rates = vm.rates || [];
  return {
    read: sum(rates.map((r) => r.readIOPS)), write: sum(rates.map((r) => r.writeIOPS)),
    readBytes: sum(rates.map((r) => r.readBytesPerSecond)), writeBytes: sum(rates.map((r) => r.writeBytesPerSecond)),
    errors: sum(rates.map((r) => r.errorsPerSecond)),
    p99: Math.max(0, ...rates.map((r) => r.latencyP99Milliseconds || 0)),
  };
}

// ---- the API ---------------------------------------------------------------------------
class Unauthorized extends Error {}
async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + state.token }, body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let value = null;
  try { value = text ? JSON.parse(text) : null; } catch { value = null; }
  if (response.status === 401) throw new Unauthorized((value && value.message) || "the token is not valid");
  if (!response.ok) throw new Error((value && value.message) || `${method} ${path}: ${response.status}`);
  return value;
}
// An action the user asked for: its outcome is a toast, never an uncaught rejection.
async function act(label, method, path, body) {
  try {
    const value = await api(method, path, body);
    toast(label);
    await refreshSlow().catch(() => {});
    return value;
  } catch (error) {
    if (error instanceof Unauthorized) return signOut(error.message);
    toast(error.message, true);
    return null;
  }
}

// ---- signing in and out ----------------------------------------------------------------
async function signIn(token) {
  state.token = token;
  try {
    state.session = await api("GET", "/session");
  } catch (error) {
    state.token = null;
    sessionStorage.removeItem("iofilter-token");
    $("#login-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem("iofilter-token", token);
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#account").hidden = false;
  $("#login-error").textContent = "";
  $("#whoami").textContent = `${state.session.name} · ${state.session.role}`;
  show(location.hash.startsWith("#view=") ? location.hash.slice(6) : "vms");
  try {
    await refreshSlow();
  } catch (error) {
    if (error instanceof Unauthorized) return signOut(error.message);
  }
  live();
}
function signOut(reason) {
  state.token = null;
  state.session = null;
  sessionStorage.removeItem("iofilter-token");
  if (state.stream) state.stream.abort();
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#tabs").hidden = true;
  $("#account").hidden = true;
  $("#stale").hidden = true;
  $("#login").hidden = false;
  $("#token").value = "";
  $("#login-error").textContent = reason || "";
}
function show(tab) {
  if (!document.querySelector(`#tabs button[data-tab="${tab}"]`)) tab = "vms";
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === tab);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + tab;
}

// ---- loading ---------------------------------------------------------------------------
// What the live stream does not carry: refreshed every 15 s and after each action.
async function refreshSlow() {
  const [host, policies, plugins, capabilities] = await Promise.all([
    api("GET", "/host"), api("GET", "/policies"), api("GET", "/plugins"), api("GET", "/capabilities"),
  ]);
  state.hostVersion = `${host.version} · acceptance level ${host.acceptanceLevel}`;
  $("#host-version").textContent = state.hostVersion;
  Object.assign(state, { policies, plugins, capabilities });
  drawPolicies();
  drawPlugins();
}

// The live stream: VMs with health and rates, disks, events, once a second. It ends at
// once when the token is revoked or the host stops; the page then says so.
async function live() {
  const badge = $("#live-state");
  while (state.token) {
    const controller = new AbortController();
    state.stream = controller;
    try {
      const response = await fetch("/live", { headers: { Authorization: "Bearer " + state.token }, signal: controller.signal });
      if (response.status === 401) {
        const body = await response.json().catch(() => ({}));
        return signOut(`Signed out: ${body.message || "the token is no longer valid"} (revoked or expired).`);
      }
      if (!response.ok) throw new Error(`live updates: ${response.status}`);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        let end;
        while ((end = pending.indexOf("\n\n")) >= 0) {
          const message = pending.slice(0, end);
          pending = pending.slice(end + 2);
          const data = message.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
          if (data) update(JSON.parse(data));
        }
      }
    } catch (error) {
      if (!state.token) return;
    }
    markStale();
    badge.textContent = "reconnecting…";
    badge.className = "pill warn";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function update(snapshot) {
  state.lastUpdate = new Date(snapshot.time * 1000);
  const running = (vms) => vms.filter((vm) => vm.state === "running").map((vm) => vm.name).join();
  const runningChanged = running(snapshot.vms) !== running(state.vms);
  state.vms = snapshot.vms;
  state.disks = snapshot.disks;
  state.events = snapshot.events;
  document.body.classList.remove("stale");
  $("#stale").hidden = true;
  const badge = $("#live-state");
  badge.textContent = "live";
  badge.className = "pill ok";
  drawVMs();
  drawDisks();
  drawEvents();
  // Operations may run in any running VM: the plug-ins' choices follow.
  if (runningChanged) drawPlugins();
  refreshOpenCharts();
}

// The host went away (or the network): the figures on screen are the last ones, and
// the page says how old they are instead of showing them as current.
function markStale() {
  if (!state.token) return;
  document.body.classList.add("stale");
  const banner = $("#stale");
  banner.hidden = false;
  const ago = state.lastUpdate ? Math.max(0, (Date.now() - state.lastUpdate.getTime()) / 1000) : null;
  banner.textContent = state.lastUpdate
    ? `The host does not answer. What you see was last updated at ${fmt.time(state.lastUpdate)} (${fmt.duration(ago)} ago); states and figures may have changed since. Reconnecting…`
    : "The host does not answer. Reconnecting…";
  drawVMs();
}
setInterval(() => {
  if (!state.token || !state.lastUpdate) return;
  if (Date.now() - state.lastUpdate.getTime() > 5000) markStale();
}, 1000);

// ---- VMs ---------------------------------------------------------------------------------
function healthPill(health, attributes = {}) {
  const status = health ? health.status : "unknown";
  return el("span", Object.assign({ class: `pill ${status}`, "data-health": status, title: health && health.reason ? health.reason : null }, attributes), status);
}

function visibleVMs() {
  const query = $("#vm-filter").value.trim().toLowerCase();
  const matches = (vm) => !query || [vm.name, ...vm.disks, ...(vm.filters || []).flatMap((d) => d.filters.map((f) => f.plugin))]
    .some((text) => text.toLowerCase().includes(query));
  const by = $("#vm-sort").value;
  const key = {
    name: () => 0,
    health: (vm) => -(vm.state === "running" && vm.health ? healthOrder[vm.health.status] + 1 : 0),
    iops: (vm) => -(vmRates(vm).read + vmRates(vm).write),
    throughput: (vm) => -(vmRates(vm).readBytes + vmRates(vm).writeBytes),
  }[by] || (() => 0);
  return state.vms.filter(matches).sort((a, b) => key(a) - key(b) || a.name.localeCompare(b.name));
}

function drawVMs() {
  const stale = document.body.classList.contains("stale");
  const vms = visibleVMs();
  const running = state.vms.filter((vm) => vm.state === "running");
  const worst = running.map((vm) => (vm.health ? vm.health.status : "ok")).sort((a, b) => healthOrder[b] - healthOrder[a])[0] || "ok";
  const hostHealth = $("#host-health");
  hostHealth.textContent = stale ? "unknown" : `host ${worst}`;
  hostHealth.className = `pill ${stale ? "unknown" : worst}`;
  $("#vm-count").textContent = stale ? `${vms.length} of ${state.vms.length} VM(s), as last seen`
    : `${vms.length} of ${state.vms.length} VM(s) · ${running.length} running`;
  const fresh = el("div", {}, vms.map((vm) => vmCard(vm, stale)));
  if (state.vms.length === 0) fresh.append(el("p", { class: "muted", "data-key": "none" }, "No VMs yet: iofilter vm create NAME --disk DISK"));
  else if (vms.length === 0) fresh.append(el("p", { class: "muted", "data-key": "none" }, "No VM matches the filter."));
  morphChildren($("#vm-cards"), fresh);
}

function metric(label, value, key, title) {
  return el("div", { class: "metric", title }, el("b", { "data-metric": key }, value), el("span", {}, label));
}

function vmCard(vm, stale) {
  const running = vm.state === "running";
  const shownState = stale ? "unknown" : vm.state;
  const rates = vmRates(vm);
  const health = running && !stale ? vm.health : null;
  const filters = (vm.filters || []).flatMap((disk) => disk.filters.map((filter) => filterBlock(disk.disk, filter)));
  return el("article", { class: `card health-${health ? health.status : "none"}`, "data-vm": vm.name, "data-key": `vm:${vm.name}` },
    el("h3", {}, vm.name, el("span", { class: `pill ${shownState}`, "data-state": shownState }, shownState), running ? healthPill(health) : null),
    health && health.status !== "ok" ? el("div", { class: `reason ${health.status}`, "data-reason": "" }, health.reason) : null,
    el("div", { class: "meta" }, running
      ? `worker ${vm.pid || "restarting"} · ${vm.restarts} restart(s) · since ${fmt.dateTime(new Date(vm.startedAt))}`
      : `disks: ${vm.disks.join(", ")}`),
    running ? el("div", { class: "metrics" },
      metric("read IOPS", fmt.number(rates.read), "read-iops"), metric("write IOPS", fmt.number(rates.write), "write-iops"),
      metric("read", fmt.throughput(rates.readBytes), "read-throughput"), metric("write", fmt.throughput(rates.writeBytes), "write-throughput"),
      metric("p99 latency", vm.rates && vm.rates.some((r) => r.latencyP99Milliseconds != null) ? fmt.ms(rates.p99) : "–", "p99",
        "the slowest disk's 99th percentile over the last interval"),
      metric("errors", fmt.rate(rates.errors), "errors")) : null,
    running ? el("div", { class: "meta uris" }, Object.entries(vm.uris).map(([disk, uri]) => el("div", {}, el("code", {}, uri)))) : null,
    filters,
    el("details", { class: "charts", "data-charts": vm.name },
      el("summary", {}, "History (last hour)"), el("div", { class: "chart-grid", "data-keep": "", "data-chart-holder": vm.name })),
    el("div", { class: "actions" },
      running
        ? gated("operator", el("button", { class: "danger", "data-action": "stop", "data-vm": vm.name }, "Stop"))
        : gated("operator", el("button", { "data-action": "start", "data-vm": vm.name }, "Start"))));
}

function filterBlock(disk, filter) {
  const health = filter.health || { status: "ok", reason: "" };
  const lag = filter.stats.lag_seconds, rpo = filter.stats.rpo_seconds;
  const effective = lag !== undefined && rpo !== undefined && lag > rpo && health.status === "ok"
    ? { status: "degraded", reason: `lag ${fmt.duration(lag)} is past the RPO of ${fmt.duration(rpo)}` } : health;
  return el("div", { class: "filter", "data-filter": `${disk}/${filter.plugin}`, "data-key": `filter:${disk}/${filter.plugin}` },
    el("h4", {}, `${disk} · ${filter.plugin} `, el("span", { class: "muted" }, filter.version), " ", healthPill(effective)),
    effective.status !== "ok" ? el("div", { class: `reason ${effective.status}` }, effective.reason) : null,
    // Lag against the RPO as a bar (SVG: the page's policy allows no inline styles).
    lag !== undefined && rpo !== undefined ? el("div", { class: "lag", "data-lag": "" },
      el("svg:svg", { viewBox: "0 0 100 6", preserveAspectRatio: "none", class: "lag-bar" },
        el("svg:rect", { width: 100, height: 6, class: "track" }),
        el("svg:rect", { width: Math.min(100, Math.round((lag / rpo) * 100)), height: 6, class: lag > rpo ? "fill over" : "fill" })),
      el("span", {}, `lag ${fmt.duration(lag)} of ${fmt.duration(rpo)} RPO`)) : null,
    el("table", { class: "stats" }, Object.keys(filter.stats).sort().map((key) =>
      el("tr", { "data-key": key }, el("td", {}, key), el("td", { "data-stat": key, "data-value": String(filter.stats[key]) }, fmt.stat(key, filter.stats[key]))))));
}

// ---- charts (SVG, drawn from GET /vms/{name}/history) ----------------------------------
// Series colours are classes c0…c3 in console.css.
const seriesColours = 4;
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  return [1, 2, 2.5, 5, 10].map((step) => step * power).find((candidate) => candidate >= value);
}
function chart(title, format, series, from, to) {
  const width = 340, height = 150, left = 58, right = 8, top = 8, bottom = 22;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
  const top_ = niceMax(Math.max(0, ...values));
  const x = (t) => left + ((t - from) / Math.max(1, to - from)) * (width - left - right);
  const y = (v) => top + (1 - v / top_) * (height - top - bottom);
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  for (const fraction of [0, 0.5, 1]) {
    const v = top_ * fraction;
    svg.append(el("svg:line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(el("svg:text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" }, format(v)));
  }
  for (let i = 0; i <= 3; i++) {
    const t = from + ((to - from) * i) / 3;
    const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
    svg.append(el("svg:text", { x: x(t), y: height - 6, "text-anchor": anchor, class: "axis" },
      new Date(t * 1000).toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" })));
  }
  series.forEach((s, index) => {
    // A gap in the history (the worker did not answer, the VM stopped) breaks the line.
    let run = [];
    const flush = () => {
      if (run.length) svg.append(el("svg:polyline", { points: run.join(" "), class: `line c${index % seriesColours}` }));
      run = [];
    };
    let previous = null;
    for (const [t, v] of s.points) {
      if (!Number.isFinite(v) || (previous !== null && t - previous > 3 * state.chartInterval)) flush();
      if (Number.isFinite(v)) run.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      previous = t;
    }
    flush();
  });
  const legend = el("div", { class: "legend" }, series.map((s, index) =>
    el("span", {}, el("i", { class: `c${index % seriesColours}` }), `${s.name} ${s.points.length ? format(s.points[s.points.length - 1][1]) : "–"}`)));
  return el("figure", { class: "chart-box" }, el("figcaption", {}, title), svg, legend);
}
state.chartInterval = 10;

async function drawCharts(name) {
  const holder = document.querySelector(`[data-chart-holder="${CSS.escape(name)}"]`);
  if (!holder) return;
  let history;
  try {
    history = await api("GET", `/vms/${encodeURIComponent(name)}/history?seconds=3600`);
  } catch (error) {
    if (error instanceof Unauthorized) return signOut(error.message);
    holder.replaceChildren(el("p", { class: "muted" }, `no history: ${error.message}`));
    return;
  }
  state.chartInterval = history.intervalSeconds;
  const points = history.points;
  const to = points.length ? points[points.length - 1].time : Date.now() / 1000;
  const from = Math.min(points.length ? points[0].time : to, to - 600);
  const disks = [...new Set(points.flatMap((p) => p.disks.map((d) => d.disk)))];
  const series = (disk, field) => points.map((p) => {
    const rates = p.disks.find((d) => d.disk === disk);
    return [p.time, rates && rates[field] != null ? rates[field] : NaN];
  });
  const charts = [];
  for (const disk of disks) {
    charts.push(chart(`${disk} · IOPS`, (v) => fmt.number(v, v < 10 && v > 0 ? 1 : 0),
      [{ name: "read", points: series(disk, "readIOPS") }, { name: "write", points: series(disk, "writeIOPS") }], from, to));
    charts.push(chart(`${disk} · throughput`, fmt.throughput,
      [{ name: "read", points: series(disk, "readBytesPerSecond") }, { name: "write", points: series(disk, "writeBytesPerSecond") }], from, to));
    charts.push(chart(`${disk} · latency`, fmt.ms,
      [{ name: "p50", points: series(disk, "latencyP50Milliseconds") }, { name: "p99", points: series(disk, "latencyP99Milliseconds") }], from, to));
  }
  // Each filter's own figures: the ones that move (or the first), two at most per chart.
  const filterKeys = [...new Set(points.flatMap((p) => p.filters.map((f) => `${f.disk}\u0000${f.plugin}`)))];
  for (const key of filterKeys) {
    const [disk, plugin] = key.split("\u0000");
    const samples = points.map((p) => [p.time, p.filters.find((f) => f.disk === disk && f.plugin === plugin)]);
    const stats = [...new Set(samples.flatMap(([, f]) => (f ? Object.keys(f.stats) : [])))].sort();
    const moving = stats.filter((stat) => new Set(samples.map(([, f]) => (f ? f.stats[stat] : undefined))).size > 1);
    const byUnit = {};
    for (const stat of (moving.length ? moving : stats.slice(0, 1))) (byUnit[fmt.statUnit(stat)] = byUnit[fmt.statUnit(stat)] || []).push(stat);
    for (const [unit, names] of Object.entries(byUnit).slice(0, 2)) {
      const format = unit === "percent" ? fmt.percent : unit === "bytes" ? fmt.bytes : unit === "seconds" ? fmt.duration : (v) => fmt.number(v, v < 10 ? 1 : 0);
      charts.push(chart(`${disk} · ${plugin.split(".").pop()} · ${names.slice(0, 2).join(", ")}`, format,
        names.slice(0, 2).map((stat) => ({ name: stat, points: samples.map(([t, f]) => [t, f && f.stats[stat] != null ? f.stats[stat] : NaN]) })), from, to));
    }
  }
  if (charts.length === 0) charts.push(el("p", { class: "muted" }, `No history yet: the host samples every ${history.intervalSeconds} s while the VM runs.`));
  holder.replaceChildren(...charts);
  state.charts[name] = Date.now();
}
function refreshOpenCharts() {
  for (const details of document.querySelectorAll("details[data-charts][open]")) {
    const name = details.dataset.charts;
    if (Date.now() - (state.charts[name] || 0) >= state.chartInterval * 1000) drawCharts(name);
  }
}

// ---- disks -------------------------------------------------------------------------------
function drawDisks() {
  const fresh = el("tbody", {}, state.disks.map((disk) => {
    const policy = el("select", { "data-policy-for": disk.name, "aria-label": `policy of ${disk.name}` },
      el("option", { value: "" }, "(none)"), state.policies.map((p) => el("option", { value: p.name, selected: p.name === disk.policy }, p.name)));
    return el("tr", { "data-disk": disk.name, "data-key": `disk:${disk.name}` },
      el("td", {}, el("b", {}, disk.name), disk.replicaOf ? el("div", { class: "muted" }, `replica kept by ${disk.replicaOf}`) : null,
        disk.snapshotOf ? el("div", { class: "muted" }, `snapshot of ${disk.snapshotOf}`) : null,
        disk.activity ? el("div", { class: "muted" }, disk.activity) : null),
      el("td", { "data-label": "size" }, fmt.bytes(disk.sizeBytes), disk.readOnly ? el("div", { class: "muted" }, "read-only") : null),
      el("td", { "data-label": "VM" }, disk.vm || "–"),
      el("td", { "data-label": "health" }, disk.health ? healthPill(disk.health) : el("span", { class: "muted" }, "not served"),
        disk.health && disk.health.reason ? el("div", { class: "muted" }, disk.health.reason) : null),
      el("td", { "data-label": "policy" }, policy, " ", gated("admin", el("button", { class: "secondary", "data-action": "assign", "data-disk": disk.name }, "Assign"))),
      el("td", { "data-label": "compliance" }, el("span", { class: `pill ${disk.compliance.status}`, "data-compliance": disk.compliance.status }, disk.compliance.status),
        disk.compliance.reason ? el("div", { class: "muted" }, disk.compliance.reason) : null),
      el("td", { "data-label": "filters" }, disk.attached.length ? disk.attached.map((f) => el("div", {}, `${f.plugin} `, el("span", { class: "muted" }, `${f.version} [${f.category}]`))) : "none"),
      el("td", {}, el("div", { class: "actions" },
        el("input", { placeholder: "snapshot name", size: 14, "data-snapshot-name": disk.name, "aria-label": `snapshot name for ${disk.name}` }),
        gated("operator", el("button", { class: "secondary", "data-action": "snapshot", "data-disk": disk.name }, "Snapshot")))));
  }));
  if (state.disks.length === 0) fresh.append(el("tr", { "data-key": "none" }, el("td", { colspan: 8, class: "muted" }, "No disks yet: iofilter disk create NAME --size SIZE")));
  morphChildren($("#disk-rows"), fresh);
}

// ---- policies ----------------------------------------------------------------------------
// In chain order, consumer side first.
const categoryNames = { inspection: "Inspection", replication: "Replication", encryption: "Encryption", cache: "Cache", qos: "Storage I/O control (qos)" };

// One field per parameter, from the plug-in's declared schema.
function parameterField(parameter) {
  const name = `param-${parameter.name}`;
  let input;
  if (parameter.kind === "bool") input = el("input", { type: "checkbox", name, checked: parameter.defaultValue === "true" });
  else if (parameter.kind === "enum") input = el("select", { name }, parameter.enumValues.map((v) => el("option", { value: v, selected: v === parameter.defaultValue }, v)));
  else input = el("input", { name, type: parameter.kind === "int" ? "number" : "text", min: parameter.min, max: parameter.max,
    placeholder: parameter.defaultValue || (parameter.isPath ? "path or URI" : ""), required: parameter.required });
  input.dataset.parameter = parameter.name;
  input.dataset.default = parameter.defaultValue || "";
  return el("label", { title: parameter.description }, `${parameter.name}${parameter.required ? " *" : ""}`, input,
    el("span", { class: "muted" }, parameter.description));
}

function drawPolicies() {
  morphChildren($("#policy-list"), el("div", {}, state.policies.map((policy) => el("div", { class: "card", "data-policy": policy.name, "data-key": `policy:${policy.name}` },
    el("h3", {}, policy.name), el("div", { class: "meta" }, policy.description || ""),
    policy.filters.map((rule) => el("div", {}, el("b", {}, rule.plugin), rule.version ? ` ${rule.version}` : "",
      el("div", { class: "muted" }, Object.entries(rule.parameters).map(([k, v]) => `${k}=${v}`).join(", "))))))));
  // The editor is rebuilt only when the catalogue changed: never under the user's hands.
  const shown = JSON.stringify(state.capabilities);
  if (shown === state.capabilitiesShown) return;
  state.capabilitiesShown = shown;
  const holder = $("#policy-categories");
  const categories = state.capabilities ? state.capabilities.categories : [];
  holder.replaceChildren(...categories.map((category) => {
    const offered = state.capabilities.plugins.filter((p) => p.category === category);
    const params = el("div", { class: "params" });
    const choice = el("select", { "data-category": category }, el("option", { value: "" }, "(none)"), offered.map((p) => el("option", { value: p.plugin }, `${p.plugin} ${p.versions[0]}`)));
    choice.addEventListener("change", () => {
      const plugin = offered.find((p) => p.plugin === choice.value);
      params.replaceChildren(...(plugin ? plugin.parameters.map(parameterField) : []));
    });
    const fieldset = el("fieldset", {}, el("legend", {}, categoryNames[category] || category),
      offered.length ? choice : el("span", { class: "muted" }, "no plug-in of this category is installed"), params);
    fieldset.disabled = offered.length === 0;
    return fieldset;
  }));
  for (const button of document.querySelectorAll("#policy-editor [data-needs]")) {
    button.disabled = !may(button.dataset.needs);
    if (button.disabled) button.title = `needs the ${button.dataset.needs} role`;
  }
}

// A button, not a form submission: the page's policy allows no form actions.
async function createPolicy() {
  if (!$("#policy-editor").reportValidity()) return;
  const filters = [];
  for (const fieldset of document.querySelectorAll("#policy-categories fieldset")) {
    const choice = fieldset.querySelector("select[data-category]");
    if (!choice || !choice.value) continue;
    const parameters = {};
    for (const input of fieldset.querySelectorAll("[data-parameter]")) {
      const value = input.type === "checkbox" ? String(input.checked) : input.value;
      if (value !== "" && value !== input.dataset.default) parameters[input.dataset.parameter] = value;
    }
    filters.push({ plugin: choice.value, parameters });
  }
  if (filters.length === 0) return toast("choose at least one filter", true);
  await act(`policy ${$("#policy-name").value} created`, "POST", "/policies",
    { name: $("#policy-name").value, description: $("#policy-description").value, filters });
}

// ---- plug-ins ----------------------------------------------------------------------------
// "add(arg1: int32, arg2: string) -> int32": the arguments' names and types.
function signatureArguments(signature) {
  const inside = signature.slice(signature.indexOf("(") + 1, signature.lastIndexOf(")")).trim();
  return inside ? inside.split(",").map((part) => { const [name, type] = part.split(":").map((s) => s.trim()); return { name, type }; }) : [];
}

function drawPlugins() {
  const newest = {};
  for (const plugin of state.plugins) if (!newest[plugin.name]) newest[plugin.name] = plugin;
  const running = state.vms.filter((vm) => vm.state === "running").map((vm) => vm.name);
  morphChildren($("#plugin-cards"), el("div", {}, state.plugins.map((plugin) => {
    const operations = plugin.operations.map((operation) => {
      const args = signatureArguments(operation.signature);
      const inputs = args.map((arg) => arg.type === "bool"
        ? el("input", { type: "checkbox", "data-arg": arg.name, "aria-label": arg.name })
        : el("input", { placeholder: `${arg.name}: ${arg.type}`, type: /^(u?int|double)/.test(arg.type) ? "number" : "text", "data-arg": arg.name, size: 10, "aria-label": arg.name }));
      const where = el("select", { "data-where": "", "aria-label": "where to call it" }, el("option", { value: "" }, "fresh worker"), running.map((vm) => el("option", { value: vm }, `in VM ${vm}`)));
      return el("div", { class: "op", "data-operation": operation.name, "data-key": `op:${operation.name}` }, el("code", {}, operation.signature),
        el("div", { class: "actions" }, inputs, where,
          gated("operator", el("button", { class: "secondary", "data-action": "call", "data-call": operation.name, "data-plugin": plugin.name }, "Call"))),
        el("div", { class: "result", hidden: true, "data-keep": "" }));
    });
    const daemon = plugin.daemon;
    return el("div", { class: "card", "data-plugin": `${plugin.name}@${plugin.version}`, "data-key": `plugin:${plugin.name}@${plugin.version}` },
      el("h3", {}, plugin.name, el("span", { class: "muted" }, plugin.version),
        el("span", { class: `pill ${plugin.acceptanceLevel}`, "data-level": plugin.acceptanceLevel }, plugin.acceptanceLevel)),
      el("div", { class: "meta" }, `${plugin.category} · ${plugin.vendor} · ${plugin.threadModel}`),
      el("div", {}, plugin.description),
      el("div", { class: "meta" }, plugin.signers.length ? `signed by ${plugin.signers.map((s) => `${s.comment || s.keyId} (${s.effective})`).join(", ")}` : "unsigned",
        " · ", plugin.attachedTo.length ? `on ${plugin.attachedTo.join(", ")}` : "on no disk"),
      daemon ? el("div", { class: "meta" }, "daemon ", el("span", { class: `pill ${daemon.state}` }, daemon.state),
        daemon.pid ? ` pid ${daemon.pid}` : "", ` · ${daemon.restarts} restart(s)`, daemon.listen ? ` · peers on ${daemon.listen}` : "",
        daemon.lastError ? ` · last: ${daemon.lastError}` : "") : null,
      operations.length && newest[plugin.name] === plugin ? el("div", {}, el("h4", {}, "Operations"), operations) : null);
  })));
}

async function callOperation(button) {
  const op = button.closest("[data-operation]");
  const result = op.querySelector(".result");
  const body = {
    operation: button.dataset.call,
    arguments: [...op.querySelectorAll("[data-arg]")].map((i) => (i.type === "checkbox" ? String(i.checked) : i.value)),
  };
  const where = op.querySelector("[data-where]").value;
  if (where) body.vm = where;
  try {
    const answer = await api("POST", `/plugins/${button.dataset.plugin}/call`, body);
    result.textContent = answer.value === "" ? `(${answer.type})` : answer.value;
  } catch (error) {
    if (error instanceof Unauthorized) return signOut(error.message);
    result.textContent = error.message;
  }
  result.hidden = false;
}

// ---- events ------------------------------------------------------------------------------
const severityOrder = { info: 0, warning: 1, error: 2, critical: 3 };
function drawEvents() {
  const least = severityOrder[$("#event-severity").value] || 0;
  const events = state.events.filter((event) => severityOrder[event.severity] >= least).slice().reverse();
  const fresh = el("tbody", {}, events.map((event) => el("tr", { "data-event": event.kind, "data-key": `event:${event.id}`, class: `severity-${event.severity}` },
    el("td", { class: "muted nowrap", title: event.time }, fmt.dateTime(new Date(event.time))),
    el("td", { "data-label": "severity" }, el("span", { class: `pill ${event.severity}`, "data-severity": event.severity }, event.severity)),
    el("td", { "data-label": "kind" }, el("b", {}, event.kind)), el("td", { "data-label": "subject" }, event.subject),
    el("td", { "data-label": "what" }, event.message), el("td", { class: "muted", "data-label": "by" }, event.actor || ""))));
  if (events.length === 0) fresh.append(el("tr", { "data-key": "none" }, el("td", { colspan: 6, class: "muted" }, "No events at this severity.")));
  morphChildren($("#event-rows"), fresh);
}

// ---- actions: one listener for every button that says what it does ------------------
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-action]");
  if (!button || button.disabled) return;
  const { action, vm, disk } = button.dataset;
  if (action === "start") act(`started ${vm}`, "POST", `/vms/${vm}/start`);
  else if (action === "stop") act(`stopped ${vm}`, "POST", `/vms/${vm}/stop`);
  else if (action === "assign") {
    const policy = document.querySelector(`[data-policy-for="${CSS.escape(disk)}"]`).value;
    act(`policy of ${disk} set`, "PUT", `/disks/${disk}/policy`, policy ? { policy } : {});
  } else if (action === "snapshot") {
    const name = document.querySelector(`[data-snapshot-name="${CSS.escape(disk)}"]`).value.trim();
    if (!name) return toast("name the snapshot first", true);
    act(`snapshot ${name} of ${disk} made`, "POST", `/disks/${disk}/snapshot`, { name });
  } else if (action === "call") callOperation(button);
});
// A chart panel draws when opened.
document.addEventListener("toggle", (event) => {
  const details = event.target;
  if (details.matches && details.matches("details[data-charts]") && details.open) drawCharts(details.dataset.charts);
}, true);
// No promise of this page goes unhandled: anything left over is shown, not thrown.
window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  toast(String(event.reason && event.reason.message ? event.reason.message : event.reason), true);
});

// ---- start ----------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => {
      show(button.dataset.tab);
      history.replaceState(null, "", `#view=${button.dataset.tab}`);
    });
  }
  $("#login-form").addEventListener("submit", (event) => { event.preventDefault(); signIn($("#token").value.trim()); });
  $("#sign-out").addEventListener("click", () => signOut("Signed out."));
  $("#policy-editor").addEventListener("submit", (event) => event.preventDefault());
  $("#policy-create").addEventListener("click", createPolicy);
  $("#vm-filter").addEventListener("input", drawVMs);
  $("#vm-sort").addEventListener("change", drawVMs);
  $("#event-severity").addEventListener("change", drawEvents);
  setInterval(() => { if (state.token && !document.body.classList.contains("stale")) refreshSlow().catch(() => {}); }, 15000);
  // A link may carry the token in its fragment (never sent to the server); it is taken
  // off the address at once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || sessionStorage.getItem("iofilter-token");
  if (fragment.has("token")) history.replaceState(null, "", location.pathname);
  if (token) signIn(token);
});
