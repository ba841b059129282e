// Rekku's read-only web view (rekku/view_api.py). Everything shown comes from the bearer-token JSON routes;
// the token lives in this tab's sessionStorage only. Payloads are written by a model: every text goes
// into the page with textContent (never parsed as HTML), so markup in them is shown, never run.
"use strict";

(() => {
  const TOKEN_KEY = "rekku.apiToken";
  const PAGE_SIZE = 25;
  const REFRESH_MS = 15000;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  let token = sessionStorage.getItem(TOKEN_KEY);
  let filters = {};
  let pages = [null]; // the cursor of each page seen; the last one is shown
  let nextCursor = null;
  let timer = null;
  let listAsked = 0; // answers to older requests than the newest are dropped (filters changed meanwhile)
  let detailAsked = 0;

  class Unauthorized extends Error {}

  // ------------------------------------------------------------------ HTTP
  async function api(path, withToken) {
    const resp = await fetch(path, {headers: {Authorization: "Bearer " + (withToken || token)}, cache: "no-store"});
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (resp.status === 401) throw new Unauthorized((body && body.detail) || "unauthorized");
    if (!resp.ok) {
      const errors = body && Array.isArray(body.errors) ? body.errors.map((e) => e.msg || String(e)).join("; ") : "";
      throw new Error(((body && body.detail) || resp.status + " " + resp.statusText) + (errors ? ": " + errors : ""));
    }
    return body;
  }

  function failed(where, err) {
    if (err instanceof Unauthorized) { logout("The ingress refused the token; log in again."); return; }
    $(where).textContent = String(err.message || err);
  }

  // ------------------------------------------------------------------ DOM helpers (text only)
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null ? "" : String(cell);
      tr.appendChild(td);
    }
    return tr;
  }

  function asJSON(value) {
    return value === null || value === undefined ? "" : JSON.stringify(value, null, 2);
  }

  function shortTime(iso) {
    return iso ? iso.replace("T", " ").replace(/\+00:00$/, "").slice(0, 23) : "";
  }

  function seconds(a, b) {
    if (!a || !b) return "";
    return ((Date.parse(b) - Date.parse(a)) / 1000).toFixed(3) + " s";
  }

  // ------------------------------------------------------------------ login
  function showLoggedIn(yes) {
    $("login").hidden = yes;
    $("main").hidden = !yes;
    $("logout").hidden = !yes;
  }

  function logout(message) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    if (timer) clearInterval(timer);
    timer = null;
    showLoggedIn(false);
    $("detail").hidden = true;
    $("login-error").textContent = message || "";
  }

  async function login(event) {
    event.preventDefault();
    const given = $("token").value.trim();
    $("login-error").textContent = "";
    try {
      await api("/v1/stats?minutes=1", given);
    } catch (err) {
      $("login-error").textContent = err instanceof Unauthorized
        ? "Wrong token: the ingress refused it." : "Cannot log in: " + (err.message || err);
      return;
    }
    token = given;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    start();
  }

  function start() {
    showLoggedIn(true);
    loadStats();
    loadActions();
    if (timer) clearInterval(timer);
    timer = setInterval(loadStats, REFRESH_MS);
  }

  // ------------------------------------------------------------------ overview: chart, queues, workers
  async function loadStats() {
    let stats;
    try { stats = await api("/v1/stats?minutes=60"); } catch (err) { failed("stats-error", err); return; }
    $("stats-error").textContent = stats.broker_error || "";
    drawChart(stats.per_minute);
    const lat = stats.latency;
    const fmt = (s) => (s === null ? "n/a" : s.toFixed(3) + " s");
    $("latency-summary").textContent = `${lat.finished} actions finished; from creation to finish p50 ${fmt(lat.p50_seconds)}, ` +
      `p99 ${fmt(lat.p99_seconds)}` + (stats.truncated ? " (only the newest actions were read)" : "");
    const queues = $("queues").tBodies[0];
    queues.replaceChildren(...Object.entries(stats.queues || {}).map(([pool, n]) => row([pool, n])));
    const workers = $("workers").tBodies[0];
    workers.replaceChildren(...Object.entries(stats.workers || {}).map(
      ([pool, nodes]) => row([pool, nodes.length, nodes.join(", ")])));
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function drawChart(minutes) {
    const W = 760, H = 220, left = 44, right = 54, top = 14, bottom = 28;
    const plotW = W - left - right, plotH = H - top - bottom;
    const maxCount = Math.max(1, ...minutes.map((m) => m.created));
    const maxLatency = Math.max(0.001, ...minutes.map((m) => m.p99_seconds || 0));
    const chart = svg("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`});
    const step = plotW / Math.max(1, minutes.length);
    chart.appendChild(svg("line", {x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, class: "axis"}));
    minutes.forEach((m, i) => {
      const h = (m.created / maxCount) * plotH;
      const bar = svg("rect", {x: left + i * step + 1, y: top + plotH - h, width: Math.max(1, step - 2), height: h,
                               class: "bar", "data-minute": m.minute, "data-count": m.created});
      bar.appendChild(svg("title", {}, `${shortTime(m.minute)}: ${m.created} created, ${m.finished} finished, ` +
        `${m.failed} failed; p50 ${m.p50_seconds ?? "n/a"} s, p99 ${m.p99_seconds ?? "n/a"} s`));
      chart.appendChild(bar);
    });
    for (const [key, cls] of [["p50_seconds", "p50"], ["p99_seconds", "p99"]]) {
      const points = minutes.map((m, i) => [m[key], i]).filter(([v]) => v !== null)
        .map(([v, i]) => [left + (i + 0.5) * step, top + plotH - (v / maxLatency) * plotH]);
      if (points.length) {
        chart.appendChild(svg("polyline", {points: points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "),
                                           class: cls, "data-points": points.length}));
        // a dot per minute too: one minute alone draws no line
        for (const [x, y] of points) chart.appendChild(svg("circle", {cx: x, cy: y, r: 2.5, class: cls + "-dot"}));
      }
    }
    chart.appendChild(svg("text", {x: 4, y: top + 10}, String(maxCount)));
    chart.appendChild(svg("text", {x: 4, y: top + plotH}, "0"));
    chart.appendChild(svg("text", {x: W - right + 4, y: top + 10}, maxLatency.toFixed(2) + " s"));
    chart.appendChild(svg("text", {x: left, y: H - 8}, "actions created per minute (bars); " +
      "p50 (green) and p99 (red) from creation to finish"));
    if (minutes.length) chart.appendChild(svg("text", {x: left + plotW - 40, y: H - 8}, shortTime(minutes[minutes.length - 1].minute).slice(11, 16)));
    $("chart").replaceChildren(chart);
  }

  // ------------------------------------------------------------------ the list
  function query() {
    const params = new URLSearchParams({limit: String(PAGE_SIZE)});
    for (const [k, v] of Object.entries(filters)) if (v) params.set(k, v);
    const cursor = pages[pages.length - 1];
    if (cursor) params.set("cursor", cursor);
    params.set("redact", "true");
    return "/v1/actions?" + params.toString();
  }

  async function loadActions() {
    const asked = ++listAsked;
    let page;
    try { page = await api(query()); } catch (err) { if (asked === listAsked) failed("list-error", err); return; }
    if (asked !== listAsked) return;
    $("list-error").textContent = "";
    nextCursor = page.next_cursor;
    const body = $("actions").tBodies[0];
    body.replaceChildren(...page.actions.map((a) => {
      const open = el("button", a.id, "link");
      open.type = "button";
      open.addEventListener("click", () => loadDetail(a.id));
      const tr = row([shortTime(a.created_at), open, a.type, el("span", a.status, "status-" + a.status), a.queue,
                      a.worker, a.attempts]);
      tr.dataset.id = a.id;
      return tr;
    }));
    if (!page.actions.length) body.appendChild(row(["no actions match"]));
    $("page-number").textContent = "page " + pages.length;
    $("older-page").disabled = !nextCursor;
    $("newer-page").disabled = pages.length < 2;
  }

  function applyFilters(event) {
    event.preventDefault();
    filters = {status: $("f-status").value, type: $("f-type").value.trim(), chat_id: $("f-chat").value.trim(),
               batch_id: $("f-batch").value.trim()};
    pages = [null];
    loadActions();
  }

  // ------------------------------------------------------------------ one action
  async function loadDetail(id) {
    const asked = ++detailAsked;
    let a;
    try { a = await api("/v1/actions/" + encodeURIComponent(id) + "?redact=true"); } catch (err) {
      failed("list-error", err); return;
    }
    if (asked !== detailAsked) return;
    $("detail-id").textContent = a.id;
    const fields = [["status", a.status], ["type", a.type], ["queue", a.queue], ["worker", a.worker || ""],
      ["attempts", a.attempts], ["batch", a.batch_id], ["created", shortTime(a.created_at)],
      ["started", shortTime(a.started_at)], ["finished", shortTime(a.finished_at)],
      ["waited (created → started)", seconds(a.created_at, a.started_at)],
      ["ran (started → finished)", seconds(a.started_at, a.finished_at)],
      ["total (created → finished)", seconds(a.created_at, a.finished_at)]];
    $("detail-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
    $("detail-payload").textContent = asJSON(a.payload);
    $("detail-result").textContent = asJSON(a.result);
    $("detail-error").textContent = a.error || "";
    $("detail-progress").textContent = asJSON(a.progress);
    $("detail-context").textContent = asJSON(a.context);
    $("detail").hidden = false;
    $("detail").scrollIntoView();
  }

  // ------------------------------------------------------------------ wiring
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", () => logout(""));
    $("refresh").addEventListener("click", () => { loadStats(); loadActions(); });
    $("filters").addEventListener("submit", applyFilters);
    $("clear-filters").addEventListener("click", (event) => { $("filters").reset(); applyFilters(event); });
    $("newest-page").addEventListener("click", () => { pages = [null]; loadActions(); });
    $("newer-page").addEventListener("click", () => { if (pages.length > 1) pages.pop(); loadActions(); });
    $("older-page").addEventListener("click", () => { if (nextCursor) { pages.push(nextCursor); loadActions(); } });
    $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
    if (token) start(); else showLoggedIn(false);
  });
})();
