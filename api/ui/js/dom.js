// A tiny element builder: text always goes in as text nodes (no innerHTML with data).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const shortId = (id) => id.slice(0, 8);

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
    minute: "2-digit", second: "2-digit" });
}

export function fmt(x, digits = 2) {
  if (x === undefined || x === null || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}

export function progressBar(value, status) {
  return h("span", { class: `bar ${status || ""}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": value }, h("span", { style: `width:${value}%` }));
}

export function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

/** A poller that stops when the page changes (each view gets a fresh one). */
export class Poller {
  constructor(fn, ms) { this.fn = fn; this.ms = ms; this.stopped = false; }
  async start() {
    while (!this.stopped) {
      try { await this.fn(); } catch (e) { console.warn(e); }
      if (this.stopped) break;
      await new Promise((r) => { this.timer = setTimeout(r, this.ms); });
    }
  }
  stop() { this.stopped = true; clearTimeout(this.timer); }
}

/** replaceChildren without the DOM's "null" text for absent parts. */
export function put(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}
