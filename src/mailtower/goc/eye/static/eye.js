// VirusEye page: renders each snapshot the server pushes over server-sent events.
// No framework and no external asset (the GOC reaches no CDN). Every value from the database
// is set as text (textContent / SVG attributes), never as markup: recipients are attacker-chosen.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#58a6ff", "#f0883e", "#3fb950", "#d2a8ff", "#ff7b72", "#e3b341",
    "#39c5cf", "#db61a2"];
  const ARRIVED_MS = 60000; // how long a newly arrived outbreak stays highlighted
  const $ = (id) => document.getElementById(id);

  let knownNames = null; // outbreak names of the previous snapshot; null before the first one
  const arrivedAt = new Map(); // name → when it appeared on this page
  let serverOffsetMs = 0; // server clock − browser clock, from the snapshot's "now"

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "title") node.title = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const serverNow = () => Date.now() + serverOffsetMs;

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function utc(iso) {
    const d = new Date(iso);
    return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function hhmm(epochS) {
    return new Date(epochS * 1000).toISOString().slice(11, 16);
  }

  const towerColours = new Map();
  function towerColour(name) {
    if (!towerColours.has(name)) {
      towerColours.set(name, PALETTE[towerColours.size % PALETTE.length]);
    }
    return towerColours.get(name);
  }

  // -- connection -----------------------------------------------------------------------------

  function setLive(state, text) {
    const pill = $("live");
    pill.className = "pill " + { live: "pill-live", wait: "pill-wait", bad: "pill-bad" }[state];
    pill.textContent = text;
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("open", () => setLive("live", "live"));
    source.addEventListener("snapshot", (event) => {
      try {
        render(JSON.parse(event.data));
      } catch (err) {
        console.error("VirusEye: cannot render snapshot", err);
      }
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused the stream: a 401 means the session ended.
        setLive("bad", "disconnected");
        fetch("/api/snapshot", { credentials: "same-origin" }).then((r) => {
          if (r.status === 401) window.location.assign("/login");
          else setTimeout(connect, 5000);
        }, () => setTimeout(connect, 5000));
      } else {
        setLive("wait", "reconnecting…");
      }
    });
  }

  // -- rendering ------------------------------------------------------------------------------

  function render(snap) {
    if (snap.now) serverOffsetMs = Date.parse(snap.now) - Date.now();
    const banner = $("banner");
    if (snap.error) {
      banner.hidden = false;
      const since = new Date(snap.error.since * 1000).toISOString().slice(11, 19);
      banner.textContent = `${snap.error.message} (since ${since} UTC)` +
        (snap.now ? ` — showing data as of ${utc(snap.now)}` : "");
      setLive("bad", "database down");
    } else {
      banner.hidden = true;
    }
    if (!snap.outbreaks) return; // no good snapshot yet
    $("updated").textContent = "updated " + utc(snap.now).slice(11);
    const windowH = Math.round(snap.window_s / 3600);
    $("s-window-label").textContent = `virus detections, last ${windowH} h`;
    $("th-window").textContent = `${windowH} h`;
    renderSummary(snap);
    renderOutbreaks(snap, windowH);
    renderTowers(snap);
    renderTimeline(snap.timeline);
    renderEngines(snap.engines, windowH);
  }

  function renderSummary(snap) {
    $("s-hour").textContent = snap.totals.virus_last_hour;
    $("s-window").textContent = snap.totals.virus_window;
    $("s-outbreaks").textContent = snap.outbreaks.length;
    const fresh = snap.outbreaks.filter((o) => o.new).length;
    $("s-new").textContent = fresh;
    $("s-new").parentElement.classList.toggle("hot", fresh > 0);
    const healthy = snap.towers.filter((t) => towerState(t, snap.thresholds).cls === "ok").length;
    $("s-towers").textContent = `${healthy}/${snap.towers.length}`;
    $("s-towers").parentElement.classList.toggle("warn", healthy < snap.towers.length);
  }

  function chips(items, limit, total) {
    const cell = el("td");
    for (const item of items.slice(0, limit)) cell.append(el("span", { class: "chip", text: item }));
    const rest = (total ?? items.length) - Math.min(items.length, limit);
    if (rest > 0) cell.append(el("span", { class: "more", text: `+${rest} more` }));
    return cell;
  }

  function renderOutbreaks(snap, windowH) {
    const now = Date.now();
    const names = new Set(snap.outbreaks.map((o) => o.name));
    if (knownNames !== null) {
      for (const o of snap.outbreaks) {
        if (!knownNames.has(o.name) && !arrivedAt.has(o.name)) {
          arrivedAt.set(o.name, now);
          toast(o);
        }
      }
    }
    knownNames = names;
    for (const [name, at] of arrivedAt) if (now - at > ARRIVED_MS) arrivedAt.delete(name);

    const body = document.createElement("tbody");
    for (const o of snap.outbreaks) {
      const row = el("tr", { "data-virus": o.name });
      if (arrivedAt.has(o.name)) row.classList.add("arrived");
      const name = el("td", { class: "virus", text: o.name });
      if (o.new) name.append(el("span", { class: "badge badge-new", text: "NEW" }));
      row.append(name);
      row.append(el("td", { title: utc(o.first_seen) }, ago(o.first_seen),
        el("div", { class: "small", text: "last " + ago(o.last_seen) })));
      row.append(chips(o.towers, 6));
      const customers = chips(o.customers, 3, o.customers_count);
      customers.prepend(el("b", { text: `${o.customers_count} ` }));
      customers.title = o.customers.join(", ");
      row.append(customers);
      row.append(caughtBy(o));
      row.append(rateCell(o));
      row.append(el("td", { class: "r", text: o.detections }));
      body.append(row);
    }
    $("outbreaks").tBodies[0].replaceWith(body);
    $("no-outbreaks").hidden = snap.outbreaks.length > 0;
    $("outbreak-note").textContent = `seen in the last ${windowH} h, busiest first`;
  }

  function caughtBy(o) {
    const cell = el("td", {}, el("b", { text: o.first_engine || "?" }));
    const first = o.engines.length ? Date.parse(o.engines[0].first_at) : null;
    const later = o.engines.filter((e) => e.engine !== o.first_engine);
    if (later.length) {
      const detail = later.map((e) => {
        const min = Math.round((Date.parse(e.first_at) - first) / 60000);
        return min > 0 ? `${e.engine} +${min} min` : e.engine;
      });
      cell.append(el("div", { class: "small", text: "then " + detail.join(", ") }));
    }
    return cell;
  }

  function rateCell(o) {
    const cell = el("td", { class: "r" }, el("span", { class: "rate", text: `${o.last_hour}/h` }));
    if (o.last_hour > o.previous_hour) {
      cell.append(el("span", { class: "up", text: " ▲", title: `previous hour ${o.previous_hour}` }));
    } else if (o.last_hour < o.previous_hour) {
      cell.append(el("span", { class: "down", text: " ▼", title: `previous hour ${o.previous_hour}` }));
    }
    return cell;
  }

  function toast(o) {
    const box = el("div", { class: "toast" },
      el("b", { text: "New outbreak: " }), o.name,
      el("div", { class: "small", text: `${o.towers.join(", ")} · caught by ${o.first_engine}` }));
    $("toasts").append(box);
    setTimeout(() => box.remove(), 15000);
  }

  function towerState(t, th) {
    if (t.stale || t.scanners_total === null) return { cls: "stale", text: "STALE" };
    if (t.scanners_up === 0) return { cls: "bad", text: "NO SCANNER" };
    if (t.scanners_up < t.scanners_total || t.queue_size > th.queue_warn ||
        (t.replication_lag_s !== null && t.replication_lag_s > th.lag_warn_s) ||
        t.scanners_behind > 0 || (t.clamav && t.clamav.scanners_behind > 0)) {
      return { cls: "warn", text: "DEGRADED" };
    }
    return { cls: "ok", text: "OK" };
  }

  // "rules v7", "rules v7 · 3 behind v8" (scanners still on an older bundle); "no bundle" (the
  // shipped rules, or no bundles at this tower) or "rules unknown" (a mirror, no answer).
  function rulesText(t) {
    const running = t.rules_bundle !== null ? `rules v${t.rules_bundle}` :
      t.rules_target === null ? "no bundle" : "rules unknown";
    if (t.scanners_behind > 0) {
      const target = t.rules_target === null ? "" : ` v${t.rules_target}`;
      return `${running} · ${t.scanners_behind} behind${target}`;
    }
    return running;
  }

  // The official ClamAV databases in the tower's mirror, one row each: "v27500 · built 3 h ago
  // · 2 behind" (scanners serving without that version); then the GOC's last good check
  // upstream. Nothing for a tower that takes none.
  function clamavRows(t, row) {
    const c = t.clamav;
    if (!c || typeof c !== "object") return;
    const since = (epochS) => ago(new Date(epochS * 1000).toISOString());
    for (const [db, d] of Object.entries(c.databases || {})) {
      let text = `v${d.version}`;
      if (typeof d.built_at === "number") text += ` · built ${since(d.built_at)}`;
      if (d.behind > 0) text += ` · ${d.behind} behind`;
      if (c.rejected) text += " · canary failed, not rolled";
      row(`clamav ${db}`, text, d.behind > 0 || c.rejected);
    }
    row("clamav upstream", typeof c.upstream_last_ok === "number" ?
      `GOC checked ${since(c.upstream_last_ok)}` : "GOC never checked",
    typeof c.upstream_last_ok !== "number");
  }

  function renderTowers(snap) {
    const list = document.createElement("div");
    list.id = "towers";
    list.className = "tower-list";
    const th = snap.thresholds;
    for (const t of snap.towers) {
      const state = towerState(t, th);
      const card = el("div", { class: `tower ${state.cls}`, "data-tower": t.tower });
      card.append(el("header", {},
        el("span", { class: "name", text: t.tower }),
        el("span", { class: "state", text: state.text })));
      if (t.scanners_total === null) {
        card.append(el("div", { class: "small", text: "no status reported by this tower" }));
      } else {
        const dl = el("dl");
        const row = (label, value, warn) => {
          dl.append(el("dt", { text: label }), el("dd", { class: warn ? "warn" : "", text: value }));
        };
        row("scanners up", `${t.scanners_up} / ${t.scanners_total}`, t.scanners_up < t.scanners_total);
        row("queue", t.queue_size, t.queue_size > th.queue_warn);
        row("replication lag", t.replication_lag_s === null ? "no standby" :
          `${t.replication_lag_s.toFixed(1)} s`,
          t.replication_lag_s === null || t.replication_lag_s > th.lag_warn_s);
        row("rules", rulesText(t), t.scanners_behind > 0);
        clamavRows(t, row);
        row("reported", ago(t.updated_at), t.stale);
        card.append(dl);
        const meter = el("div", { class: "meter" }, el("div"));
        meter.firstChild.style.width =
          `${t.scanners_total ? (100 * t.scanners_up) / t.scanners_total : 0}%`;
        card.append(meter);
      }
      list.append(card);
    }
    if (!snap.towers.length) list.append(el("p", { class: "empty", text: "No tower has reported." }));
    $("towers").replaceWith(list);
  }

  function renderTimeline(tl) {
    const W = 900, H = 230, L = 40, R = 10, T = 10, B = 24;
    const towers = Object.keys(tl.towers).sort();
    let max = 1;
    for (const name of towers) for (const n of tl.towers[name]) max = Math.max(max, n);
    const ceiling = niceCeiling(max);
    const x = (i) => L + ((W - L - R) * i) / Math.max(1, tl.count - 1);
    const y = (n) => T + (H - T - B) * (1 - n / ceiling);
    const chart = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "virus detections per tower over time" });
    // Detections are whole numbers: no gridline at a half.
    const ticks = ceiling % 2 === 0 ? [0, ceiling / 2, ceiling] : [0, ceiling];
    for (const n of ticks) {
      chart.append(svgEl("line", { x1: L, x2: W - R, y1: y(n), y2: y(n), class: "axis" }));
      chart.append(svgEl("text", { x: L - 6, y: y(n) + 4, "text-anchor": "end" }, n));
    }
    const perHour = Math.max(1, Math.round(3600 / tl.bucket_s));
    for (let i = 0; i < tl.count; i++) {
      const at = tl.start + i * tl.bucket_s;
      if (at % 3600 === 0 || (perHour > tl.count && i === 0)) {
        chart.append(svgEl("line", { x1: x(i), x2: x(i), y1: T, y2: H - B, class: "axis" }));
        chart.append(svgEl("text", { x: x(i), y: H - 6, "text-anchor": "middle" }, hhmm(at)));
      }
    }
    const legend = el("div", { class: "legend" });
    for (const name of towers) {
      const series = tl.towers[name];
      const colour = towerColour(name);
      const points = series.map((n, i) => `${x(i).toFixed(1)},${y(n).toFixed(1)}`).join(" ");
      const area = svgEl("polygon", {
        points: `${x(0)},${y(0)} ${points} ${x(series.length - 1)},${y(0)}`,
        fill: colour, "fill-opacity": 0.08 });
      const line = svgEl("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2,
        "stroke-linejoin": "round", "data-tower": name });
      line.append(svgEl("title", {}, `${name}: ${series.reduce((a, b) => a + b, 0)} detections`));
      chart.append(area, line);
      const total = series.reduce((a, b) => a + b, 0);
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colour;
      legend.append(el("span", {}, swatch, `${name} (${total})`));
    }
    const box = $("timeline");
    box.replaceChildren(chart, legend);
    const minutes = Math.round(tl.bucket_s / 60);
    $("timeline-note").textContent =
      `last ${Math.round((tl.count * tl.bucket_s) / 3600)} h, per ${minutes} min, UTC`;
  }

  function niceCeiling(max) {
    const step = 10 ** Math.floor(Math.log10(max));
    for (const m of [1, 2, 4, 6, 8, 10]) if (m * step >= max) return m * step;
    return 10 * step;
  }

  function renderEngines(engines, windowH) {
    const box = document.createElement("div");
    box.id = "engines";
    const max = Math.max(1, ...engines.map((e) => e.catches));
    for (const e of engines) {
      const fg = el("div", { class: "bar-fg" });
      fg.style.width = `${(100 * e.catches) / max}%`;
      box.append(el("div", { class: "engine", "data-engine": e.engine },
        el("span", { class: "ename", text: e.engine }),
        el("div", { class: "bar-bg" }, fg),
        el("span", { class: "count", text: e.catches }),
        el("div", { class: "detail",
          text: `${e.last_hour} in the last hour · ${e.alone} caught by it alone` })));
    }
    if (!engines.length) box.append(el("p", { class: "empty", text: "No catches in the window." }));
    $("engines").replaceWith(box);
    $("engines-note").textContent = `virus messages, last ${windowH} h`;
  }

  connect();
})();
