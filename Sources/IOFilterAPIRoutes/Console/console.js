// The iofilterd console: one page over the host's own API, with the caller's token.
// Everything it shows comes from the API; everything it does is an API call, so the
// host's roles decide what a user may do (the page only greys out what would be refused).
"use strict";

const roles = ["read-only", "operator", "admin"];
const state = { token: null, session: null, vms: [], disks: [], policies: [], plugins: [], capabilities: null, history: {} };

// ---- DOM helpers (text only: names come from plug-ins and users) ----------------------
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const $ = (selector) => document.querySelector(selector);
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
  node.dataset.needs = needed;
  if (!may(needed)) {
    node.disabled = true;
    node.title = `needs the ${needed} role (you have ${state.session ? state.session.role : "none"})`;
  }
  return node;
}

// ---- the API ---------------------------------------------------------------------------
async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: Object.assign({ Authorization: "Bearer " + state.token }, body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const value = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((value && value.message) || `${method} ${path}: ${response.status}`);
  return value;
}
async function act(label, method, path, body) {
  try {
    const value = await api(method, path, body);
    toast(label);
    await refresh();
    return value;
  } catch (error) {
    toast(error.message, true);
    throw error;
  }
}

// ---- signing in ------------------------------------------------------------------------
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
  $("#whoami").textContent = `${state.session.name} · ${state.session.role}`;
  show("vms");
  await refresh();
  live();
}
function show(tab) {
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === tab);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + tab;
}

// ---- loading and drawing ---------------------------------------------------------------
async function refresh() {
  const [host, vms, disks, policies, plugins, capabilities, events] = await Promise.all([
    api("GET", "/host"), api("GET", "/vms"), api("GET", "/disks"), api("GET", "/policies"), api("GET", "/plugins"),
    api("GET", "/capabilities"), api("GET", "/events?limit=50"),
  ]);
  $("#host-version").textContent = `${host.version} · acceptance level ${host.acceptanceLevel}`;
  Object.assign(state, { disks, policies, plugins, capabilities });
  mergeVMs(vms);
  drawVMs();
  drawDisks();
  drawPolicies();
  drawPlugins();
  drawEvents(events);
}

// Keeps the live figures a list answer lacks (`GET /vms` carries no statistics).
function mergeVMs(vms) {
  const previous = Object.fromEntries(state.vms.map((vm) => [vm.name, vm]));
  state.vms = vms.map((vm) => (vm.filters.length === 0 && previous[vm.name] && vm.state === "running" ? Object.assign({}, vm, { filters: previous[vm.name].filters }) : vm));
}

const number = (value, digits = 0) => (Number.isFinite(value) ? value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits }) : "–");
function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return `${number(value, unit ? 1 : 0)} ${units[unit]}`;
}

// Totals of a VM's I/O counters, and the rates between two live updates.
function totals(vm) {
  const sum = { requests: 0, bytes: 0, errors: 0, latency: 0 };
  for (const disk of vm.filters || []) for (const op of disk.io || []) {
    sum.requests += op.requests; sum.bytes += op.bytes; sum.errors += op.errors; sum.latency += op.latencySeconds;
  }
  return sum;
}
function rates(name) {
  const samples = state.history[name] || [];
  if (samples.length < 2) return null;
  const [a, b] = samples.slice(-2);
  const seconds = b.time - a.time;
  if (seconds <= 0) return null;
  const requests = b.requests - a.requests;
  return {
    iops: requests / seconds, throughput: (b.bytes - a.bytes) / seconds,
    latency: requests > 0 ? ((b.latency - a.latency) / requests) * 1000 : 0, errors: b.errors - a.errors,
  };
}
function sparkline(name) {
  const samples = state.history[name] || [];
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    const seconds = samples[i].time - samples[i - 1].time;
    points.push(seconds > 0 ? (samples[i].requests - samples[i - 1].requests) / seconds : 0);
  }
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 60 34");
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(1, ...points);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((value, i) => `${60 - (points.length - 1 - i)},${32 - (value / top) * 30}`).join(" "));
  svg.append(line);
  return svg;
}

function drawVMs() {
  const cards = $("#vm-cards");
  cards.replaceChildren(...state.vms.map((vm) => {
    const running = vm.state === "running";
    const rate = running ? rates(vm.name) : null;
    const metric = (label, value, key) => el("div", { class: "metric" }, el("b", { "data-metric": key }, value), el("span", {}, label));
    const filters = (vm.filters || []).flatMap((disk) => disk.filters.map((filter) =>
      el("div", { class: "filter", "data-filter": `${disk.disk}/${filter.plugin}` },
        el("h4", {}, `${disk.disk} · ${filter.plugin} `, el("span", { class: "muted" }, filter.version)),
        el("table", { class: "stats" }, Object.keys(filter.stats).sort().map((key) =>
          el("tr", {}, el("td", {}, key), el("td", { "data-stat": key }, number(filter.stats[key], filter.stats[key] % 1 ? 3 : 0))))))));
    return el("div", { class: "card", "data-vm": vm.name },
      el("h3", {}, vm.name, el("span", { class: `pill ${vm.state}`, "data-state": vm.state }, vm.state)),
      el("div", { class: "meta" }, running ? `worker ${vm.pid} · ${vm.restarts} restart(s) · since ${new Date(vm.startedAt).toLocaleString()}` : `disks: ${vm.disks.join(", ")}`),
      running ? el("div", { class: "metrics" },
        metric("IOPS", rate ? number(rate.iops) : "…", "iops"), metric("throughput", rate ? bytes(rate.throughput) + "/s" : "…", "throughput"),
        metric("mean latency", rate ? number(rate.latency, 2) + " ms" : "…", "latency"), metric("errors", rate ? number(rate.errors) : "…", "errors")) : null,
      running ? sparkline(vm.name) : null,
      running ? el("div", { class: "meta" }, Object.entries(vm.uris).map(([disk, uri]) => el("div", {}, el("code", {}, uri)))) : null,
      filters,
      el("div", { class: "actions" },
        running
          ? gated("operator", el("button", { class: "danger", "data-action": "stop", onclick: () => act(`stopped ${vm.name}`, "POST", `/vms/${vm.name}/stop`) }, "Stop"))
          : gated("operator", el("button", { "data-action": "start", onclick: () => act(`started ${vm.name}`, "POST", `/vms/${vm.name}/start`) }, "Start"))));
  }));
  if (state.vms.length === 0) cards.append(el("p", { class: "muted" }, "No VMs yet: iofilter vm create NAME --disk DISK"));
}

function drawDisks() {
  $("#disk-rows").replaceChildren(...state.disks.map((disk) => {
    const policy = el("select", { "data-policy-for": disk.name },
      el("option", { value: "" }, "(none)"), state.policies.map((p) => el("option", { value: p.name, selected: p.name === disk.policy }, p.name)));
    const snapshotName = el("input", { placeholder: "snapshot name", size: 14, "data-snapshot-name": disk.name });
    return el("tr", { "data-disk": disk.name },
      el("td", {}, el("b", {}, disk.name), disk.replicaOf ? el("div", { class: "muted" }, `replica kept by ${disk.replicaOf}`) : null,
        disk.snapshotOf ? el("div", { class: "muted" }, `snapshot of ${disk.snapshotOf}`) : null),
      el("td", {}, bytes(disk.sizeBytes), disk.readOnly ? el("div", { class: "muted" }, "read-only") : null),
      el("td", {}, disk.vm || "–"),
      el("td", {}, policy, " ", gated("admin", el("button", { class: "secondary", onclick: () =>
        act(`policy of ${disk.name} set`, "PUT", `/disks/${disk.name}/policy`, policy.value ? { policy: policy.value } : {}) }, "Assign"))),
      el("td", {}, el("span", { class: `pill ${disk.compliance.status}`, "data-compliance": disk.compliance.status }, disk.compliance.status),
        disk.compliance.reason ? el("div", { class: "muted" }, disk.compliance.reason) : null),
      el("td", {}, disk.attached.length ? disk.attached.map((f) => el("div", {}, `${f.plugin} `, el("span", { class: "muted" }, `${f.version} [${f.category}]`))) : "none"),
      el("td", {}, el("div", { class: "actions" }, snapshotName, gated("operator", el("button", { class: "secondary", "data-action": "snapshot", onclick: () => {
        if (!snapshotName.value) return toast("name the snapshot first", true);
        act(`snapshot ${snapshotName.value} of ${disk.name} made`, "POST", `/disks/${disk.name}/snapshot`, { name: snapshotName.value });
      } }, "Snapshot")))));
  }));
}

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
  $("#policy-list").replaceChildren(...state.policies.map((policy) => el("div", { class: "card", "data-policy": policy.name },
    el("h3", {}, policy.name), el("div", { class: "meta" }, policy.description || ""),
    policy.filters.map((rule) => el("div", {}, el("b", {}, rule.plugin), rule.version ? ` ${rule.version}` : "",
      el("div", { class: "muted" }, Object.entries(rule.parameters).map(([k, v]) => `${k}=${v}`).join(", ")))))));
  // The editor: per category, a choice of plug-in and that plug-in's parameters.
  const holder = $("#policy-categories");
  const categories = state.capabilities ? state.capabilities.categories : [];
  holder.replaceChildren(...categories.map((category) => {
    const offered = state.capabilities.plugins.filter((p) => p.category === category);
    const params = el("div", { class: "params" });
    const choice = el("select", { "data-category": category, onchange: () => {
      const plugin = offered.find((p) => p.plugin === choice.value);
      params.replaceChildren(...(plugin ? plugin.parameters.map(parameterField) : []));
    } }, el("option", { value: "" }, "(none)"), offered.map((p) => el("option", { value: p.plugin }, `${p.plugin} ${p.versions[0]}`)));
    return el("fieldset", { disabled: offered.length === 0 }, el("legend", {}, categoryNames[category] || category),
      offered.length ? choice : el("span", { class: "muted" }, "no plug-in of this category is installed"), params);
  }));
  for (const button of document.querySelectorAll("#policy-editor [data-needs]")) gated(button.dataset.needs, button);
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

// "add(arg1: int32, arg2: string) -> int32": the arguments' names and types.
function signatureArguments(signature) {
  const inside = signature.slice(signature.indexOf("(") + 1, signature.lastIndexOf(")")).trim();
  return inside ? inside.split(",").map((part) => { const [name, type] = part.split(":").map((s) => s.trim()); return { name, type }; }) : [];
}

function drawPlugins() {
  const newest = {};
  for (const plugin of state.plugins) if (!newest[plugin.name]) newest[plugin.name] = plugin;
  $("#plugin-cards").replaceChildren(...state.plugins.map((plugin) => {
    const running = state.vms.filter((vm) => vm.state === "running").map((vm) => vm.name);
    const operations = plugin.operations.map((operation) => {
      const args = signatureArguments(operation.signature);
      const inputs = args.map((arg) => arg.type === "bool"
        ? el("input", { type: "checkbox", "data-arg": arg.name })
        : el("input", { placeholder: `${arg.name}: ${arg.type}`, type: arg.type.startsWith("int") || arg.type.startsWith("uint") || arg.type === "double" ? "number" : "text", "data-arg": arg.name, size: 10 }));
      const where = el("select", {}, el("option", { value: "" }, "fresh worker"), running.map((vm) => el("option", { value: vm }, `in VM ${vm}`)));
      const result = el("div", { class: "result", hidden: true });
      const call = gated("operator", el("button", { class: "secondary", "data-call": operation.name, onclick: async () => {
        const body = { operation: operation.name, arguments: inputs.map((i) => (i.type === "checkbox" ? String(i.checked) : i.value)) };
        if (where.value) body.vm = where.value;
        try {
          const answer = await api("POST", `/plugins/${plugin.name}/call`, body);
          result.textContent = answer.value === "" ? `(${answer.type})` : answer.value;
        } catch (error) {
          result.textContent = error.message;
        }
        result.hidden = false;
      } }, "Call"));
      return el("div", { class: "op", "data-operation": operation.name }, el("code", {}, operation.signature),
        el("div", { class: "actions" }, inputs, where, call), result);
    });
    const daemon = plugin.daemon;
    return el("div", { class: "card", "data-plugin": `${plugin.name}@${plugin.version}` },
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
  }));
}

function drawEvents(events) {
  $("#event-rows").replaceChildren(...events.slice().reverse().map((event) => el("tr", { "data-event": event.kind },
    el("td", { class: "muted" }, new Date(event.time).toLocaleTimeString()), el("td", {}, el("b", {}, event.kind)),
    el("td", {}, event.subject), el("td", {}, event.message), el("td", { class: "muted" }, event.actor || ""))));
}

// ---- live updates, pushed by the host (server-sent events over fetch: it carries the token)
async function live() {
  const badge = $("#live-state");
  while (state.token) {
    try {
      const response = await fetch("/live", { headers: { Authorization: "Bearer " + state.token } });
      if (!response.ok) throw new Error(`live updates: ${response.status}`);
      badge.textContent = "live";
      badge.className = "pill ok";
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
      badge.textContent = "reconnecting…";
      badge.className = "pill warn";
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function update(snapshot) {
  for (const vm of snapshot.vms) {
    const history = (state.history[vm.name] = state.history[vm.name] || []);
    if (vm.state === "running") {
      history.push(Object.assign({ time: snapshot.time }, totals(vm)));
      if (history.length > 61) history.shift();
    } else {
      history.length = 0;
    }
  }
  state.vms = snapshot.vms;
  drawVMs();
  drawEvents(snapshot.events);
}

// ---- start ----------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => show(button.dataset.tab));
  $("#login-form").addEventListener("submit", (event) => { event.preventDefault(); signIn($("#token").value.trim()); });
  $("#policy-editor").addEventListener("submit", (event) => event.preventDefault());
  $("#policy-create").addEventListener("click", createPolicy);
  // A link may carry the token in its fragment (never sent to the server); it is taken
  // off the address at once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || sessionStorage.getItem("iofilter-token");
  if (fragment.has("token")) history.replaceState(null, "", location.pathname);
  if (token) signIn(token);
});
