// The Watchpost status page: reads the gateway's JSON and SVG, follows its events.
// Everything shown that came from devices goes in as text, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
// The device table shows one page of PAGE rows; the gateway filters, sorts and pages, so a
// site of 10,000 devices costs the browser and the link what a site of PAGE does.
const PAGE = 100;
let devices = []; // the rows on show
let deviceOffset = 0;
let deviceMatching = 0;
let sortKey = "state";
let sortUp = true;
let shown = null; // {device, metric} of the plot on show
let devicesDue = null; // a device list read about to happen (changes come in bursts)
// The gateway's device list is a copy of up to a second ago: presence changes heard as events
// since that copy are laid over it (Date.now() when heard), and the list is read again once a
// copy newer than the last change can be had.
const presence = new Map();
let changedAt = 0;
let filterDue = null;
let devicesAsked = 0; // requests for the device list: only the latest one's answer is shown

async function get(path, as) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": " + response.status);
  return as === "text" ? response.text() : as === "response" ? response : response.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}

function value(v) {
  return typeof v === "number" ? String(Math.round(v * 100) / 100) : String(v);
}

function state(d) {
  if (d.online === false) return "offline";
  if (d.stale) return "stale";
  return "online";
}

function battery(d) {
  for (const [metric, v] of Object.entries(d.values)) {
    if (metric.toLowerCase().includes("battery") && typeof v === "number") return v;
  }
  return null;
}

function renderDevices() {
  const body = $("devices").tBodies[0];
  const rows = devices.map((d) => {
    const tr = el("tr", null, state(d));
    tr.dataset.device = d.name;
    tr.append(el("td", state(d)), el("td", d.name), el("td", ago(d.last_seen_ms)));
    const values = Object.entries(d.values).map(([m, v]) => m + " " + value(v)).join(", ");
    tr.append(el("td", values), el("td", battery(d) === null ? "" : value(battery(d))));
    tr.append(el("td", d.lost), el("td", d.source));
    tr.addEventListener("click", () => showPlot(d));
    return tr;
  });
  body.replaceChildren(...rows);
  const last = deviceOffset + devices.length;
  $("device-range").textContent = deviceMatching === 0 ? "no device" : (deviceOffset + 1) + "–" + last + " of " + deviceMatching;
  $("device-prev").disabled = deviceOffset === 0;
  $("device-next").disabled = last >= deviceMatching;
}

async function loadDevices() {
  const asked = ++devicesAsked;
  const filter = $("filter").value.trim();
  const query = "sort=" + sortKey + (sortUp ? "" : "&desc=1") + "&offset=" + deviceOffset + "&limit=" + PAGE +
    (filter ? "&q=" + encodeURIComponent(filter) : "");
  const response = await get("api/devices?" + query, "response");
  const count = (name) => Number(response.headers.get(name) || 0);
  // When the copy was made, on this clock, less a margin for the time the answer and the
  // events took to arrive: a change heard around then is laid over it and read again.
  const copiedAt = Date.now() - count("watchpost-devices-age-ms") - 250;
  const answer = await response.json();
  if (asked !== devicesAsked) return; // a newer request (filter, sort, page) is on its way
  devices = answer;
  for (const [name, p] of presence) {
    if (p.heard < copiedAt - 5000) presence.delete(name);
  }
  for (const d of devices) {
    const p = presence.get(d.name);
    if (p && p.heard >= copiedAt) { d.online = p.online; d.last_seen_ms = p.at; d.stale = false; }
  }
  if (changedAt >= copiedAt) devicesSoon(1100 - (Date.now() - copiedAt));
  deviceMatching = count("watchpost-devices-matching");
  if (devices.length === 0 && deviceOffset > 0 && deviceMatching > 0) {
    // The list shrank under this page: show its last page.
    deviceOffset = Math.floor((deviceMatching - 1) / PAGE) * PAGE;
    return loadDevices();
  }
  renderDevices();
  const total = count("watchpost-devices"), down = count("watchpost-devices-not-online");
  $("device-count").textContent = "(" + total + (down ? ", " + down + " not online" : "") + ")";
}

// Reads the device list again soon (after `ms`, 300 by default): events come in bursts.
function devicesSoon(ms) {
  if (!devicesDue) {
    devicesDue = setTimeout(() => { devicesDue = null; loadDevices().catch(() => {}); }, Math.max(ms ?? 300, 50));
  }
}

function alertItem(doc) {
  const li = el("li", null, doc.severity);
  li.dataset.id = doc.id;
  li.append(el("strong", doc.rule + " "), document.createTextNode(doc.device + " " + doc.metric + " = " + value(doc.value) + " "));
  li.append(el("span", "since " + doc.since.replace("T", " ").replace("Z", " UTC"), "when"));
  return li;
}

function renderActive(active) {
  const items = active.map(alertItem);
  $("active").replaceChildren(...(items.length ? items : [el("li", "none", "none")]));
  $("alert-count").textContent = "(" + active.length + ")";
}

let active = [];
// Transitions heard as events in the last few seconds: a read of /api/alerts can be older
// than them (the database commits a moment later), so they are laid over what it says.
const recent = new Map();
const RECENT_MS = 5000;

function withRecent(list) {
  const now = Date.now();
  for (const [id, e] of recent) if (now - e.at > RECENT_MS) recent.delete(id);
  const out = list.filter((a) => !recent.has(a.id) || recent.get(a.id).doc.state === "raised");
  for (const e of recent.values()) {
    if (e.doc.state === "raised" && !out.some((a) => a.id === e.doc.id)) out.unshift(e.doc);
  }
  return out;
}

function renderToday(today, upstream) {
  const items = today.map((t) => {
    const li = el("li", null, t.state === "cleared" ? "cleared" : t.severity);
    const where = !upstream ? "" : t.in_outbox ? " · in the outbox" : " · delivered upstream";
    li.append(el("strong", t.state + " "), document.createTextNode(t.rule + " " + t.device + " "));
    li.append(el("span", t.at.slice(11, 19) + where, "when"));
    return li;
  });
  $("today").replaceChildren(...(items.length ? items : [el("li", "nothing yet", "none")]));
}

async function loadAlerts() {
  const a = await get("api/alerts");
  active = withRecent(a.active);
  renderActive(active);
  renderToday(a.today, a.upstream);
}

async function loadBandwidth() {
  const [svg, b] = await Promise.all([get("plot/bandwidth.svg", "text"), get("api/bandwidth")]);
  $("bandwidth").innerHTML = svg; // drawn by the gateway, every text in it escaped there
  $("saved").textContent = b.saved_percent === null ? "" : "(" + b.saved_percent.toFixed(2) + " % saved)";
}

async function showPlot(d) {
  const numeric = Object.entries(d.values).filter(([, v]) => typeof v === "number").map(([m]) => m);
  const metric = shown && shown.device === d.name ? numeric[(numeric.indexOf(shown.metric) + 1) % numeric.length] : numeric[0];
  $("plot-section").hidden = false;
  if (!metric) {
    $("plot-title").textContent = d.name + ": no numeric metric";
    $("plot").replaceChildren();
    return;
  }
  shown = { device: d.name, metric };
  $("plot-title").textContent = d.name + " " + metric + ", last 24 h" + (numeric.length > 1 ? " (click again for the next metric)" : "");
  const query = "device=" + encodeURIComponent(d.name) + "&metric=" + encodeURIComponent(metric);
  $("plot").innerHTML = await get("plot/series.svg?" + query, "text");
}

async function loadHealth() {
  const s = await get("status");
  $("gateway").textContent = s.gateway;
  const parts = [];
  const bad = (text) => { const b = el("span", text, "bad"); return b; };
  parts.push(s.upstream === null ? "uplink: none (alerts stay local)" : s.uplink_connected ? "uplink: connected" : bad("uplink: DOWN"));
  parts.push("outbox: " + s.outbox_depth + (s.outbox_depth ? ", oldest " + s.outbox_oldest_seconds + " s" : ""));
  parts.push(s.disk_full ? bad("disk: FULL, history shed") : "disk: ok");
  if (s.last_reload) parts.push(s.last_reload.ok ? "reload: ok" : bad("reload FAILED: " + s.last_reload.detail));
  if (s.peer) parts.push(s.peer.mirror_up && s.peer.alerts_differ_seconds === 0 ? "peer " + s.peer.name + ": in step" : bad("peer " + s.peer.name + ": " + (s.peer.mirror_up ? "alerts differ" : "unreachable")));
  const health = $("health");
  health.replaceChildren();
  parts.forEach((p, i) => { if (i) health.append(" · "); health.append(p); });
}

async function loadAll() {
  const results = await Promise.allSettled([loadHealth(), loadDevices(), loadAlerts(), loadBandwidth()]);
  if (results.some((r) => r.status === "rejected")) $("health").textContent = "cannot reach the gateway; retrying";
}

function follow() {
  const source = new EventSource("api/events");
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "alert") {
      const doc = event.doc;
      recent.set(doc.id, { doc, at: Date.now() });
      active = withRecent(active.filter((a) => a.id !== doc.id));
      renderActive(active);
      // Today's list and what reached the upstream, once the database has it.
      setTimeout(() => loadAlerts().catch(() => {}), 1000);
    } else if (event.type === "presence") {
      changedAt = Date.now();
      presence.set(event.device, { online: event.online, at: event.at, heard: changedAt });
      const d = devices.find((x) => x.name === event.device);
      if (d) { d.online = event.online; d.last_seen_ms = event.at; d.stale = false; renderDevices(); }
      devicesSoon(); // the counts, and the order when sorted by state
    } else if (event.type === "device") {
      changedAt = Date.now();
      devicesSoon();
    } else if (event.type === "reload") {
      loadAll();
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", () => {
    clearTimeout(filterDue);
    filterDue = setTimeout(() => { deviceOffset = 0; loadDevices().catch(() => {}); }, 200);
  });
  $("device-prev").addEventListener("click", () => { deviceOffset = Math.max(0, deviceOffset - PAGE); loadDevices().catch(() => {}); });
  $("device-next").addEventListener("click", () => { deviceOffset += PAGE; loadDevices().catch(() => {}); });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      sortUp = sortKey === th.dataset.sort ? !sortUp : true;
      sortKey = th.dataset.sort;
      for (const other of document.querySelectorAll("th[data-sort]")) other.removeAttribute("aria-sort");
      th.setAttribute("aria-sort", sortUp ? "ascending" : "descending");
      deviceOffset = 0;
      loadDevices().catch(() => {});
    });
  }
  loadAll();
  follow();
  setInterval(loadAll, 10000);
});
