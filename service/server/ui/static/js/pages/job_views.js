// Reconstruction previews (original | masked | reconstruction, per epoch) and the log tail.

import { api, blobUrl } from "../api.js";
import { h, problemBox } from "../dom.js";

export function previewsPanel(base, signal) {
  const el = h("div", { class: "previews", id: "previews" }, h("p", { class: "muted" }, "None yet."));
  const shown = new Map(); // name -> blob URL
  signal.addEventListener("abort", () => shown.forEach((u) => URL.revokeObjectURL(u)));
  let busy = false;
  async function refresh() {
    if (busy || signal.aborted) return;
    busy = true;
    try {
      const list = await api(`${base}/previews`, { signal });
      if (list.items.length && !shown.size) el.replaceChildren();
      const groups = new Map();
      for (const p of list.items) {
        if (shown.has(p.name)) continue;
        const label = p.epoch === null ? "end of job" : `after epoch ${p.epoch}`;
        if (!groups.has(label)) groups.set(label, []);
        groups.get(label).push(p);
      }
      for (const [label, items] of groups) {
        const row = h("div", { class: "preview-row" });
        el.prepend(h("figure", {}, h("figcaption", {}, `${label}: original | masked | reconstruction`), row));
        for (const p of items) {
          const url = await blobUrl(p.url, signal);
          shown.set(p.name, url);
          row.append(h("img", { src: url, alt: `preview ${p.name}`, class: "preview", dataset: { name: p.name } }));
        }
      }
    } catch (err) {
      if (!signal.aborted) el.replaceChildren(problemBox(err));
    } finally { busy = false; }
  }
  return { el, refresh };
}

// terminal colour codes (ESC [ ... m) in Ray's log lines
const ANSI = /\u001b\[[0-9;]*m/g;

export function logsPanel(base, signal) {
  const pre = h("pre", { class: "logs", id: "logs" });
  const follow = h("input", { type: "checkbox", id: "follow", checked: true });
  const el = h("div", {}, h("label", { for: "follow" }, follow, " follow"), pre);
  let offset = 0, source = null, complete = false, busy = false;
  async function refresh() {
    if (busy || signal.aborted || complete) return;
    busy = true;
    try {
      for (;;) {
        const page = await api(`${base}/logs?offset=${offset}&limit=262144`, { signal });
        if (source !== null && page.source !== source) { // Ray forgot the driver log: restart
          source = page.source;
          offset = 0;
          pre.textContent = "";
          continue;
        }
        source = page.source;
        pre.append(page.text.replace(ANSI, "")); // Ray colours its log prefixes
        offset = page.next_offset;
        complete = page.complete;
        if (!page.text) break;
      }
      if (pre.textContent.length > 400_000) pre.textContent = pre.textContent.slice(-200_000);
      if (follow.checked) pre.scrollTop = pre.scrollHeight;
    } catch { /* next tick */ } finally { busy = false; }
  }
  const timer = setInterval(() => { if (follow.checked) refresh(); }, 2000);
  signal.addEventListener("abort", () => clearInterval(timer));
  refresh();
  return { el, refresh };
}
