// Swarm status page: redraws on every snapshot the server pushes over /api/stream (server-sent
// events), and polls /api/all while that stream is down. No third-party code, nothing loaded from elsewhere.
// Everything peers wrote (names, roles, devices, event texts) reaches the DOM through textContent
// only, never as markup, so a peer named "<script>..." is shown as exactly that text.
"use strict";

const POLL_MS = 1500;
const SVG_NS = "http://www.w3.org/2000/svg";
const EVENT_KINDS = new Set(["join", "leave", "reject", "reload", "stale", "departed", "back", "timeout",
  "role", "start", "excluded"]);
const MAX_EVENTS_SHOWN = 200;

// ----- small helpers ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text === null || text === undefined ? "–" : String(text);
}

const isNum = (x) => typeof x === "number" && Number.isFinite(x);

function fmtBytes(n) {
  if (!isNum(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function fmtCount(n) {
  if (!isNum(n)) return "–";
  for (const [unit, scale] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (Math.abs(n) >= scale) return `${(n / scale).toFixed(2)}${unit}`;
  }
  return String(Math.round(n));
}

function fmtDuration(s) {
  if (!isNum(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

// Axis labels in powers of ten read better in decimal units (100 kB, 1 MB).
function fmtBytesAxis(n) {
  for (const [unit, scale] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (n >= scale) return `${+(n / scale).toPrecision(3)} ${unit}`;
  }
  return `${n} B`;
}

const fmtLoss = (x) => (isNum(x) ? x.toFixed(4) : "–");
const fmtClock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

// ----- summary ---------------------------------------------------------------------------------

function renderSummary(s) {
  document.getElementById("run-id").textContent = s.run_id;
  document.getElementById("run-mode").textContent = `${s.mode} · ${s.codec}`;
  document.getElementById("run-model").textContent = `${s.preset} · ${fmtCount(s.parameters)} params`;
  setText("round", s.round);
  setText("round-sub", `H = ${s.inner_steps} inner steps`);
  setText("live-peers", s.live_peers);
  setText("peers-sub", `${s.stale_peers} stale · ${s.departed_peers} departed`);
  setText("eval-loss", fmtLoss(s.eval_loss));
  setText("train-loss", `train ${fmtLoss(s.train_loss)}`);
  setText("tokens", fmtCount(s.total_tokens));
  const since = s.history_from_round > 0 ? `since round ${s.history_from_round}` : "all rounds";
  setText("tokens-sub", `${s.rounds_recorded} rounds recorded · ${since}`);
  setText("elapsed", fmtDuration(s.elapsed_s));
  setText("coordinator", `coordinator ${s.coordinator.short_id}: ${s.coordinator.state}`);
  setText("payload-bytes", fmtBytes(s.payload_bytes_total));
  setText("compression", isNum(s.compression)
    ? `${s.compression}× less than dense (${fmtBytes(s.dense_bytes_total)})` : "no payloads yet");
}

// ----- peers table -----------------------------------------------------------------------------

function peerCell(p) {
  const td = el("td", "peer");
  td.append(el("span", "name", p.name || "(unnamed)"), el("span", "id", p.short_id));
  if (p.is_coordinator) td.append(el("span", "badge coord", "coordinator"));
  td.title = p.peer_id;
  return td;
}

function stateCell(p) {
  const td = el("td", "state");
  const badge = el("span", "badge", p.state);
  badge.classList.add(p.state === "live" || p.state === "stale" ? p.state : "departed");
  td.append(badge, el("span", "phase", p.phase));
  return td;
}

function renderPeers(peers) {
  const rows = peers.map((p) => {
    const tr = el("tr");
    tr.dataset.peerId = p.peer_id;
    tr.dataset.state = p.state;
    tr.className = `state-${p.state === "live" || p.state === "stale" ? p.state : "departed"}`;
    tr.append(
      peerCell(p), el("td", "role", p.role),
      el("td", "num ram", p.ram_bytes ? fmtBytes(p.ram_bytes) : "–"),
      el("td", "num devmem", p.device_bytes ? fmtBytes(p.device_bytes) : "–"),
      el("td", "num round-bytes", p.round_bytes_in || p.round_bytes_out
        ? `${fmtBytes(p.round_bytes_in)} in / ${fmtBytes(p.round_bytes_out)} out` : "–"),
      el("td", "device", p.device), stateCell(p),
      el("td", "reach", p.reachable === false ? "behind NAT (relayed)" : "public"),
      el("td", "num round", p.round), el("td", "num", isNum(p.tokens_per_s) ? Math.round(p.tokens_per_s) : "–"),
      el("td", "num", fmtLoss(p.loss)), el("td", "num", fmtBytes(p.bytes_sent)),
      el("td", "num", fmtBytes(p.bytes_received)), el("td", "num age", `${p.heartbeat_age_s.toFixed(1)} s`),
      el("td", "version", p.version),
    );
    return tr;
  });
  document.querySelector("#peers tbody").replaceChildren(...rows);
  const live = peers.filter((p) => p.state === "live").length;
  setText("peers-count", `${live} live of ${peers.length} seen (coordinator included)`);
}

// ----- expert ownership (layer x expert -> owners) --------------------------------------------------

function renderOwnership(roles, peers) {
  const panel = document.getElementById("ownership-panel");
  const map = roles && roles.ownership;
  panel.hidden = !map;
  if (!map) return;
  const names = new Map(peers.map((p) => [p.peer_id, p.name || p.short_id]));
  const live = new Set(peers.filter((p) => p.state === "live").map((p) => p.peer_id));
  const head = el("tr");
  head.append(el("th", "", "layer"));
  for (let e = 0; e < map.experts; e++) head.append(el("th", "", `expert ${e}`));
  const rows = [];
  for (let layer = 0; layer < map.layers; layer++) {
    const tr = el("tr");
    tr.append(el("td", "num", layer));
    for (let e = 0; e < map.experts; e++) {
      const owners = map.owners[e] || [];
      const td = el("td", owners.length ? "owner" : "owner orphan", owners.map((id) => names.get(id) || id.slice(-8)).join(", ") || "none");
      td.dataset.expert = e;
      td.dataset.live = owners.some((id) => live.has(id)) ? "yes" : "no";
      tr.append(td);
    }
    rows.push(tr);
  }
  document.querySelector("#ownership thead").replaceChildren(head);
  document.querySelector("#ownership tbody").replaceChildren(...rows);
  const orphans = Object.values(map.owners).filter((o) => !o.length).length;
  setText("ownership-note", orphans ? `${orphans} expert(s) without an owner` : "every expert owned, in every layer");
}

// ----- recent rounds (the mode's own per-round figures, e.g. SPSA's scalars, as extra columns) --------

const ROUNDS_SHOWN = 12;

function fmtExtra(key, value) {
  if (!isNum(value)) return "–";
  return key.endsWith("bytes") ? fmtBytes(value) : Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function renderRounds(history) {
  const rounds = (history.rounds || []).slice(-ROUNDS_SHOWN).reverse();
  const extras = [...new Set(rounds.flatMap((r) => Object.keys(r.extra || {})))].sort();
  const head = el("tr");
  for (const label of ["round", "leader", "payloads", "rejected", "bytes", "eval loss"]) head.append(el("th", "", label));
  for (const key of extras) head.append(el("th", "", key.replaceAll("_", " ")));
  const rows = rounds.map((r) => {
    const tr = el("tr");
    tr.dataset.round = r.round;
    tr.append(
      el("td", "num", r.round), el("td", "mono", r.leader_short), el("td", "num", r.payloads),
      el("td", "num", r.rejected), el("td", "num", fmtBytes(r.payload_bytes)), el("td", "num", fmtLoss(r.eval_loss)),
    );
    for (const key of extras) {
      const td = el("td", "num", fmtExtra(key, (r.extra || {})[key]));
      td.dataset.key = key;
      tr.append(td);
    }
    return tr;
  });
  document.querySelector("#rounds thead").replaceChildren(head);
  document.querySelector("#rounds tbody").replaceChildren(...rows);
  setText("rounds-note", rounds.length ? `last ${rounds.length} closed` : "none closed yet");
}

// ----- plots -----------------------------------------------------------------------------------

function niceTicks(lo, hi, count) {
  if (hi <= lo) hi = lo + 1;
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * step; t += step) ticks.push(t);
  return ticks;
}

// series: [{label, color, points: [[x, y], ...], dashed}]; opts: {logY, step, xFormat, yFormat}
function lineChart(container, series, opts) {
  // Draw at the container's pixel width so 11px labels stay 11px.
  const W = Math.max(320, Math.round(container.clientWidth) || 560), H = 220, L = 62, R = 26, T = 10, B = 30;
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => isNum(x) && isNum(y) && (!opts.logY || y > 0));
  if (pts.length === 0) {
    container.replaceChildren(el("div", "empty", opts.empty || "waiting for data…"));
    return;
  }
  const fy = opts.logY ? Math.log10 : (y) => y;
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => fy(p[1]))), Math.max(...pts.map((p) => fy(p[1])))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= opts.logY ? 0.5 : Math.max(Math.abs(y0) * 0.1, 0.5); y1 += opts.logY ? 0.5 : Math.max(Math.abs(y1) * 0.1, 0.5); }
  if (opts.zeroY) y0 = Math.min(0, y0);
  const pad = (y1 - y0) * 0.06;
  y0 -= opts.zeroY && y0 === 0 ? 0 : pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B);
  const root = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });

  let yTicks = opts.logY
    ? niceTicks(Math.ceil(y0), Math.floor(y1), 5).filter(Number.isInteger).map((e) => Math.pow(10, e))
    : niceTicks(y0, y1, 4);
  if (yTicks.length === 0) yTicks = [Math.pow(10, y0 + pad), Math.pow(10, y1 - pad)];  // within one decade
  for (const t of yTicks) {
    root.append(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    const label = svgEl("text", { class: "axis", x: L - 6, y: sy(t) + 4, "text-anchor": "end" });
    label.textContent = (opts.yFormat || String)(t);
    root.append(label);
  }
  for (const t of niceTicks(x0, x1, 5)) {
    const label = svgEl("text", { class: "axis", x: sx(t), y: H - 8, "text-anchor": "middle" });
    label.textContent = (opts.xFormat || String)(t);
    root.append(label);
  }
  if (opts.xLabel) {
    const title = svgEl("text", { class: "axis", x: 4, y: H - 8, "text-anchor": "start" });  // under the y labels
    title.textContent = opts.xLabel;
    root.append(title);
  }
  for (const s of series) {
    const good = s.points.filter(([x, y]) => isNum(x) && isNum(y) && (!opts.logY || y > 0));
    if (good.length === 0) continue;
    const coords = [];
    good.forEach(([x, y], i) => {
      if (opts.step && i > 0) coords.push(`${sx(x).toFixed(1)},${sy(good[i - 1][1]).toFixed(1)}`);
      coords.push(`${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
    });
    const line = svgEl("polyline", { class: "series", points: coords.join(" "), stroke: s.color });
    if (s.dashed) line.setAttribute("stroke-dasharray", "5 4");
    root.append(line);
    if (good.length === 1) root.append(svgEl("circle", { cx: sx(good[0][0]), cy: sy(good[0][1]), r: 3, fill: s.color }));
  }
  const legend = el("div", "legend");
  for (const s of series) {
    const item = el("span");
    const swatch = el("i");
    swatch.style.background = s.color;
    item.append(swatch, document.createTextNode(s.label));
    legend.append(item);
  }
  container.replaceChildren(root, legend);
}

function renderPlots(history, summary, now) {
  const rounds = history.rounds;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  lineChart(document.getElementById("plot-loss"), [
    { label: "eval loss (global weights)", color: color("--c2"), points: rounds.map((r) => [r.round, r.eval_loss]) },
    { label: "train loss (mean of peers)", color: color("--c1"), points: rounds.map((r) => [r.round, r.train_loss]) },
  ], { xLabel: "round", yFormat: (v) => v.toFixed(2), empty: "waiting for the first closed round…" });
  lineChart(document.getElementById("plot-bytes"), [
    { label: "payloads (this run)", color: color("--c1"), points: rounds.map((r) => [r.round, r.payload_bytes]) },
    { label: "dense fp32 DiLoCo", color: color("--c3"), dashed: true,
      points: rounds.map((r) => [r.round, r.dense_bytes]) },
  ], { logY: true, xLabel: "round", yFormat: fmtBytesAxis, empty: "waiting for the first closed round…" });
  setText("bytes-note", isNum(summary.compression) ? `(${summary.compression}× smaller)` : "");
  const samples = history.peers_over_time;
  // Extend the last sample to now, so a steady swarm still draws a line up to the present.
  const withNow = samples.length ? [...samples, { ...samples[samples.length - 1], time: now }] : [];
  lineChart(document.getElementById("plot-peers"), [
    { label: "live", color: color("--live"), points: withNow.map((s) => [s.time, s.live]) },
    { label: "stale", color: color("--stale"), points: withNow.map((s) => [s.time, s.stale]) },
  ], { step: true, zeroY: true, xFormat: fmtClock, yFormat: (v) => (Number.isInteger(v) ? String(v) : "") });
}

// ----- events ----------------------------------------------------------------------------------

function renderEvents(events) {
  const items = events.slice(0, MAX_EVENTS_SHOWN).map((e) => {
    const li = el("li");
    const kind = el("span", "kind", e.kind);
    if (EVENT_KINDS.has(e.kind)) kind.classList.add(e.kind);
    const who = e.peer_id ? `${e.name || "?"} ${e.short_id}` : "status page";
    li.append(el("span", "time", fmtClock(e.time)), kind, el("span", "who", who), el("span", "text", e.text));
    li.title = e.peer_id;
    return li;
  });
  if (items.length === 0) items.push(el("li", "muted", "no events yet"));
  document.getElementById("events").replaceChildren(...items);
}

// ----- live updates: pushed over server-sent events, polled while the stream is down ----------------

const STREAM_RETRY_MS = 10000;  // after the stream was refused or stalled, poll this long before retrying
const STREAM_STALL_MS = 40000;  // the server pushes every DHT read (~1 s) and pings every 15 s: silence is a dead stream

function setConnection(ok, text) {
  const dot = document.getElementById("conn-dot");
  dot.className = ok ? "dot ok" : "dot bad";
  document.getElementById("conn-text").textContent = text;
}

function render(data, how) {
  renderSummary(data.summary);
  renderPeers(data.peers);
  renderOwnership(data.roles, data.peers);
  renderPlots(data.history, data.summary, data.generated_at);
  renderRounds(data.history);
  renderEvents(data.events);
  const lag = data.summary.observer.last_poll_at ? data.generated_at - data.summary.observer.last_poll_at : null;
  setConnection(true, `${how} · DHT read ${isNum(lag) ? lag.toFixed(1) : "–"} s ago · ${fmtClock(data.generated_at)}`);
}

const live = { source: null, pollTimer: null, stallTimer: null, retryTimer: null };

async function pollOnce() {
  try {
    const response = await fetch("/api/all", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json(), "polling (live stream down)");
  } catch (err) {
    setConnection(false, `cannot reach the status server (${err.message}); retrying`);
  }
}

function startPolling() {
  if (live.pollTimer !== null) return;
  const tick = async () => {
    await pollOnce();
    if (live.pollTimer !== null) live.pollTimer = setTimeout(tick, POLL_MS);
  };
  live.pollTimer = setTimeout(tick, 0);
}

function stopPolling() {
  clearTimeout(live.pollTimer);
  live.pollTimer = null;
}

function watchStall() {
  clearTimeout(live.stallTimer);
  live.stallTimer = setTimeout(() => dropStream("no update for a while"), STREAM_STALL_MS);
}

// Poll until a fresh stream is tried again.
function dropStream(why) {
  if (live.source) live.source.close();
  live.source = null;
  clearTimeout(live.stallTimer);
  setConnection(false, `live stream lost (${why}); polling`);
  startPolling();
  clearTimeout(live.retryTimer);
  live.retryTimer = setTimeout(openStream, STREAM_RETRY_MS);
}

function openStream() {
  if (typeof EventSource === "undefined") {
    startPolling();
    return;
  }
  const source = new EventSource("/api/stream");
  live.source = source;
  source.addEventListener("open", () => {
    stopPolling();
    watchStall();
  });
  source.addEventListener("ping", watchStall);
  source.addEventListener("snapshot", (event) => {
    stopPolling();
    watchStall();
    render(JSON.parse(event.data), "live");
  });
  source.addEventListener("error", () => {
    if (live.source !== source) return;
    // CONNECTING: the browser reconnects by itself; CLOSED: refused (e.g. 503), start over later.
    if (source.readyState === EventSource.CLOSED) dropStream("refused");
    else startPolling();
  });
}

document.addEventListener("DOMContentLoaded", openStream);
