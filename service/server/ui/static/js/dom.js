// Building DOM without HTML strings: every value becomes a text node or a property, so text
// from users (job errors, URIs, logs) can never become markup.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (typeof v === "boolean") el.toggleAttribute(k, v);
    else el.setAttribute(k, String(v));
  }
  el.append(...flat(children));
  return el;
}

const flat = (children) =>
  children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c)));

export const $ = (sel, root = document) => root.querySelector(sel);

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  return hh ? `${hh} h ${mm} min` : mm ? `${mm} min ${ss} s` : `${ss} s`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATES = ["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled"];

/**
 * Fraction done and seconds left, from the job's progress: steps per epoch are known once an
 * epoch has ended (its record carries the step count), before that only whole epochs count.
 */
export function progressOf(job) {
  const p = job.progress, epochs = p.epochs;
  if (job.state === "succeeded") return { frac: 1, eta: 0 };
  let frac = epochs ? (p.epoch || 0) / epochs : 0;
  const ep = job.latest_metrics?.epoch;
  if (ep && ep.epoch > 0 && p.step) frac = Math.min(1, p.step / ((ep.step / ep.epoch) * epochs));
  let eta = null;
  if (job.state === "running" && job.started_at && frac > 0 && frac < 1) {
    const elapsed = (Date.now() - Date.parse(job.started_at)) / 1000;
    eta = (elapsed * (1 - frac)) / frac;
  }
  return { frac, eta };
}

export function stateBadge(state) {
  return h("span", { class: `badge state-${state}`, dataset: { state } }, state);
}

export function problemBox(err) {
  const p = err.problem || {};
  return h("div", { class: "problem", role: "alert" },
    h("strong", {}, p.title || "Error"), " ", p.detail || err.message || String(err));
}
